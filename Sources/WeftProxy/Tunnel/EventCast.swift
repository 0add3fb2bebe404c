/// `event` as a `T`, for a caller that found its dynamic type to be `T`:
/// cast from the opened value rather than from `Any`, which costs the
/// runtime about twice as much. NIOHTTP2Handler sends several events per
/// request (window changes, stream created and closed), each an `Any`.
@inline(__always)
func unbox<T>(_ event: Any, as _: T.Type) -> T? {
    func cast<Value>(_ value: Value) -> T? { value as? T }
    return _openExistential(event, do: cast)
}
