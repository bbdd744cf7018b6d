//! Criterion benchmarks for procpool (being written).
fn main() {}
