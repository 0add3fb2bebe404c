/* The WeftABI C target needs one translation unit; compiling the header here
 * also runs its _Static_asserts with the host compiler, next to the BPF one. */
#include "weft_abi.h"
