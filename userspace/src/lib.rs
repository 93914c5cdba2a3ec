//! ewii
