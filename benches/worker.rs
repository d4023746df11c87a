//! Worker benchmark (being written).
fn main() {}
