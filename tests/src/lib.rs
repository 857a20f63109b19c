//! Harness for scm end-to-end tests.
