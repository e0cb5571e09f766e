use cudarc::cublaslt::result::CublasError;
use cudarc::driver::DriverError;

/// Every error of the CUDA backend names what it was doing: the node, the kernel, the tensor or
/// the file.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "no CUDA driver: libcuda.so.1 cannot be loaded (no NVIDIA driver on this machine; for the emulated GPU put \
         its folder first on LD_LIBRARY_PATH)"
    )]
    NoDriver,
    #[error("no CUDA device {ordinal}: {msg}")]
    NoDevice { ordinal: usize, msg: String },
    #[error("CUDA driver call failed while {what}: {err}")]
    Driver { what: String, err: DriverError },
    #[error(
        "NVRTC not found: libnvrtc.so.13 cannot be loaded (run `eval \"$(bash tools/setup_cuda.sh)\"`, or set \
         LD_LIBRARY_PATH to the CUDA lib folder)"
    )]
    NoNvrtc,
    #[error("NVRTC call {call} failed for {file}: {code}")]
    Nvrtc {
        file: String,
        call: &'static str,
        code: String,
    },
    #[error("NVRTC failed to compile {file} for {arch}:\n{log}")]
    Compile {
        file: String,
        arch: String,
        log: String,
    },
    #[error("kernel `{0}` is not defined in any kernels/*.cu")]
    UnknownKernel(String),
    #[error("loading module {file} ({format}) failed: {err}")]
    LoadModule {
        file: String,
        format: &'static str,
        err: DriverError,
    },
    #[error("kernel `{kernel}`: launch failed: {err}")]
    Launch { kernel: String, err: DriverError },
    #[error(
        "cuBLASLt not available: libcublasLt.so.13 cannot be loaded (needed for node `{node}`)"
    )]
    NoCublasLt { node: String },
    #[error("cuBLASLt failed while {what}: {err:?}")]
    Cublas { what: String, err: CublasError },
    #[error("node `{node}` ({op}): {msg}")]
    Node {
        node: String,
        op: &'static str,
        msg: String,
    },
    #[error("input `{name}`: {msg}")]
    Input { name: String, msg: String },
    #[error("value {id} is not in device memory any more (its memory was reused; build the executor with keep_all to read every node)")]
    NotKept { id: usize },
    #[error("unsupported storage dtype {0} (the CUDA executor stores f32 or bf16)")]
    DType(openuni_tensor::DType),
    #[error("{what}: {msg}")]
    Invalid { what: String, msg: String },
    #[error(transparent)]
    Tensor(#[from] openuni_tensor::Error),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

impl CudaError {
    /// Whether the device ran out of memory (so that a caller can say what would fit).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            CudaError::Driver { err, .. } => {
                err.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY
            }
            // A node's error keeps the driver error's text (e.g. its GEMM workspace allocation).
            CudaError::Node { msg, .. } => msg.contains("CUDA_ERROR_OUT_OF_MEMORY"),
            _ => false,
        }
    }
}

/// Maps a driver error to [`CudaError::Driver`] with a description of the call.
pub(crate) trait DriverContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> DriverContext<T> for std::result::Result<T, DriverError> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|err| CudaError::Driver { what: what(), err })
    }
}

impl<T> DriverContext<T> for std::result::Result<T, CublasError> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|err| CudaError::Cublas { what: what(), err })
    }
}
