//! The single integration-test binary (`cargo test --test it`). Each area adds its module
//! here as a `mod xyz;` line; `harness` is the shared toolkit (registries, skopeo, fixtures).

mod build;
mod harness;
mod push;
mod smoke;
