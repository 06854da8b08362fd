//! The crate's top-level error: one variant per stage error, plus the failures of the
//! commands that string the stages together.
//!
//! Each stage has its own error enum carrying the file/line/field or URL it concerns, and says
//! its own exit code ([`crate::exit`]); this module wraps them and depends on them, never the
//! reverse.

use crate::exit::ExitCode;

/// Any failure of the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Spec(#[from] crate::spec::SpecError),
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    #[error(transparent)]
    Layer(#[from] crate::layer::LayerError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Base(#[from] crate::base::BaseError),
    #[error(transparent)]
    Context(#[from] crate::context::ContextError),
    #[error(transparent)]
    Copy(#[from] crate::copy::CopyError),
    #[error(transparent)]
    StaticBase(#[from] crate::static_base::StaticBaseError),
    #[error(transparent)]
    Resolve(#[from] crate::resolve::ResolveError),
    #[error(transparent)]
    Init(#[from] crate::init::InitError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    /// The push succeeded, but an output file could not be written; the caller still prints
    /// `image_ref` (the image is in the registry).
    #[error("pushed {image_ref}, but {source}")]
    OutputsAfterPush {
        image_ref: String,
        #[source]
        source: std::io::Error,
    },
    /// The image and its tags are pushed, but its SBOM/provenance referrers could not be
    /// attached (exit 5: retrying the push is safe and attaches them).
    #[error(
        "pushed {image_ref} (the image itself is complete), but attaching its SBOM/provenance failed: {source}; push again to attach them, or use --sbom none --provenance none"
    )]
    AttachAfterPush {
        image_ref: String,
        #[source]
        source: crate::registry::RegistryError,
    },
    /// The thread that uploads layers during a push panicked (a bug).
    #[error("the upload thread panicked")]
    UploadThreadPanicked,
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Spec(e) => e.exit_code(),
            Error::Reference(e) => e.exit_code(),
            Error::Resolve(e) => e.exit_code(),
            Error::Image(e) => e.exit_code(),
            Error::Usage(_) => ExitCode::Usage,
            Error::Init(e) => e.exit_code(),
            Error::Plan(e) => e.exit_code(),
            Error::Layer(e) => e.exit_code(),
            Error::Io { .. } | Error::OutputsAfterPush { .. } | Error::UploadThreadPanicked => {
                ExitCode::Internal
            }
            Error::Registry(e) => e.exit_code(),
            Error::AttachAfterPush { .. } => ExitCode::Registry,
            Error::Base(e) => e.exit_code(),
            Error::Context(e) => e.exit_code(),
            Error::Copy(e) => e.exit_code(),
            Error::StaticBase(e) => e.exit_code(),
        }
    }
}
