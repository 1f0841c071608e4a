//! What every metric family's construction shares.

/// Metric construction only fails on invalid names or label sets, which are constants
/// here: a failure is a programming error caught by the tests.
pub fn must<T>(result: prometheus::Result<T>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => panic!("metric definition: {e}"),
    }
}
