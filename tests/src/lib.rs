//! Harness for end-to-end tests: spawns the real programs on free loopback ports.
