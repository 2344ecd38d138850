//! The EventRouter operator (being built).
