extension Duration {
    /// The duration as seconds in a Double (for rates, clocks given to pure code, and metrics).
    public var inSeconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}
