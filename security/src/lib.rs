//! scm Security server.
