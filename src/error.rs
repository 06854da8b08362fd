//! The crate's top-level error and the documented process exit codes.
//!
//! Each stage has its own error enum carrying the file/line/field or URL it concerns; this
//! module only sorts them into exit codes, in one place, so CI can retry on 5 and not on 2-4
//! or 6.

/// Process exit codes (README "Exit codes"). Stable: scripts depend on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    Ok = 0,
    /// A bug or an unexpected local I/O failure.
    Internal = 1,
    /// Bad command line, bad build spec, bad repository or tag.
    Usage = 2,
    /// An input artifact is missing, unreadable, or for the wrong architecture.
    Input = 3,
    /// The registry refused our credentials, or none could be found.
    Auth = 4,
    /// The registry or network still failed after retries.
    Registry = 5,
    /// The registry's TLS certificate is not trusted (unknown CA), not valid for the name
    /// used, or expired: no retry can fix it, so it is not 5.
    Trust = 6,
}

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
            Error::Spec(_) | Error::Reference(_) | Error::Usage(_) => ExitCode::Usage,
            Error::Resolve(_) => ExitCode::Usage,
            Error::Init(e) => e.exit_code(),
            Error::Plan(e) => e.exit_code(),
            Error::Layer(_) => ExitCode::Input,
            Error::Image(_)
            | Error::Io { .. }
            | Error::OutputsAfterPush { .. }
            | Error::UploadThreadPanicked => ExitCode::Internal,
            Error::Registry(e) => e.exit_code(),
            Error::AttachAfterPush { .. } => ExitCode::Registry,
            Error::Base(e) => e.exit_code(),
            Error::Context(e) => e.exit_code(),
            Error::Copy(e) => e.exit_code(),
            Error::StaticBase(e) => e.exit_code(),
        }
    }
}
