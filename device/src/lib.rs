//! scm device client.
