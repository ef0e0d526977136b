//! End-to-end tests of the whole system live under `tests/`.
