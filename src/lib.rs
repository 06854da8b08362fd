//! imgbuild: build deterministic multi-arch OCI images from prebuilt artifacts and push them
//! to any OCI registry, without a daemon.
//!
//! The pipeline runs one way: [`spec`] (parse) -> [`plan`] (resolve files per platform, check
//! ELF architectures) -> [`layer`] (tar + gzip + hash in one pass into a [`store`]) -> [`image`]
//! (config, manifests, index as canonical JSON) -> a sink: [`layout`] (OCI image layout on disk)
//! or [`registry`] (push) -> [`output`] (digest files for deploy steps).
//! [`pipeline`] strings the stages together; [`run`] is the `build` and `push` commands (base
//! images, pipeline, sink, outputs) as functions of plain requests. The binary is thin:
//! `main.rs` turns the command line, environment and standard input into a request, prints
//! the result and maps errors to exit codes.

// The AWS SDK futures nested inside registry connections (ECR auth within base resolution)
// exceed the default query depth when their layout is computed.
#![recursion_limit = "256"]

pub mod base;
pub mod baseconfig;
pub mod cache;
pub mod compress;
pub mod context;
pub mod copy;
pub mod deflate;
pub mod deploy;
pub mod digest;
pub mod docker_archive;
pub mod error;
pub mod exit;
pub mod gitref;
pub mod image;
pub mod init;
pub mod inspect;
pub mod layer;
pub mod layout;
pub mod lease;
pub mod output;
pub mod overlap;
pub mod pipeline;
pub mod plan;
pub mod platform;
pub mod progress;
pub mod provenance;
pub mod prune;
pub mod reference;
pub mod registry;
pub mod resolve;
pub mod run;
pub mod sbom;
pub mod spec;
pub mod static_base;
pub mod store;
pub mod supply;
pub mod untrusted;

pub use error::Error;
pub use exit::ExitCode;
