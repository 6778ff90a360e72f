//! `cargo xtask`: placeholder until the xtask work lands.
fn main() {}
