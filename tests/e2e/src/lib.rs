//! Shared harness for the cross-component tests (being built).
