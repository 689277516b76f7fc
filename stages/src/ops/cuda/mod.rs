//! The custom CUDA kernels of `stages/kernels/`: NVRTC compilation at run time, a module
//! cache per CUDA context, typed launchers ([`launch`]) and, with candle's CUDA backend,
//! the `CustomOp`s that run them on CUDA tensors (`candle` module).
//!
//! Two features, because candle's CUDA backend cannot be built without a CUDA toolkit:
//!
//! - `cuda`: this module against cudarc with *dynamic loading* (`libnvrtc` and `libcuda`
//!   are `dlopen`ed on first use). Builds and type-checks anywhere; with NVRTC's library on
//!   `LD_LIBRARY_PATH` it compiles the kernels with no GPU (the tests here do).
//! - `cuda-candle`: candle's own CUDA backend (its cudarc with dynamic *linking*, whose
//!   build runs nvcc) plus the `CustomOp` hooks that [`super::attention`] and
//!   [`super::lora_linear`] dispatch to for CUDA tensors. Needs a CUDA toolkit to build.
//!
//! The two are exclusive: cudarc refuses dynamic loading and dynamic linking at once. The
//! same sources serve both through the `cudarc` alias below.
//!
//! Kernels are compiled once per context for the device's own architecture
//! (`compute_XY` PTX, JIT-assembled by the driver) with [`nvrtc_options`];
//! `scripts/cuda/compile_check.py` uses the same options for the compile check, and a test
//! keeps the two in step.

#[cfg(not(feature = "cuda-candle"))]
pub(crate) use ::cudarc;
#[cfg(feature = "cuda-candle")]
pub(crate) use candle_core::cuda_backend::cudarc;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

#[cfg(feature = "cuda-candle")]
pub mod candle;
pub mod launch;
#[cfg(test)]
mod tests;

/// Prepended to every kernel file (see its header).
const COMMON: &str = include_str!("../../../kernels/common.cuh");

/// The kernel files, compiled as separate NVRTC programs.
pub const SOURCES: [(&str, &str); 2] = [
    (
        "attention.cu",
        include_str!("../../../kernels/attention.cu"),
    ),
    ("lora.cu", include_str!("../../../kernels/lora.cu")),
];

/// NVRTC options besides the architecture; `scripts/cuda/compile_check.py` uses the same.
pub const NVRTC_OPTIONS: [&str; 2] = ["-std=c++17", "--fmad=true"];

/// Errors of compiling, loading or launching the kernels.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("NVRTC failed to compile stages/kernels/{file} for {arch}:\n{log}")]
    Compile {
        file: &'static str,
        arch: String,
        log: String,
    },
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("CUDA kernel `{0}` not found in the compiled modules")]
    MissingKernel(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(
        "{0} not found: put the CUDA libraries on LD_LIBRARY_PATH (e.g. the nvidia-cuda-nvrtc wheel)"
    )]
    Library(&'static str),
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// The full source NVRTC compiles for one kernel file: `common.cuh` then the file, with a
/// `#line` so that error messages name the file's own lines.
pub fn program_source(file: &str, src: &str) -> String {
    format!("{COMMON}\n#line 1 \"{file}\"\n{src}")
}

/// NVRTC options for a virtual architecture such as `compute_90`.
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    let mut o: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
    o.push(format!("--gpu-architecture={arch}"));
    o
}

/// Whether NVRTC can be loaded (always true when the CUDA libraries are linked).
pub fn nvrtc_available() -> bool {
    #[cfg(not(feature = "cuda-candle"))]
    {
        // SAFETY: only probes for the shared library; no NVRTC call is made.
        unsafe { cudarc::nvrtc::sys::is_culib_present() }
    }
    #[cfg(feature = "cuda-candle")]
    true
}

/// Compiles every kernel file to PTX for `arch` (`compute_80`, `compute_90`, ...).
pub fn compile_all(arch: &str) -> Result<Vec<(&'static str, Ptx)>> {
    if !nvrtc_available() {
        return Err(CudaError::Library("libnvrtc"));
    }
    SOURCES
        .iter()
        .map(|&(file, src)| {
            let opts = CompileOptions {
                options: nvrtc_options(arch),
                name: Some(file.to_string()),
                ..Default::default()
            };
            cudarc::nvrtc::compile_ptx_with_opts(program_source(file, src), opts)
                .map(|ptx| (file, ptx))
                .map_err(|e| CudaError::Compile {
                    file,
                    arch: arch.to_string(),
                    log: compile_log(e),
                })
        })
        .collect()
}

fn compile_log(e: CompileError) -> String {
    match e {
        CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
        other => format!("{other:?}"),
    }
}

/// The kernels loaded into one CUDA context, with their functions resolved on first use.
pub struct Kernels {
    modules: Vec<Arc<CudaModule>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// Compute capability, e.g. (9, 0).
    pub cc: (i32, i32),
}

impl Kernels {
    /// The kernel `name`, e.g. `attn_fwd_mma_bf16_d128`.
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut fns = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = fns.get(name) {
            return Ok(f.clone());
        }
        for m in &self.modules {
            if let Ok(f) = m.load_function(name) {
                fns.insert(name.to_string(), f.clone());
                return Ok(f);
            }
        }
        Err(CudaError::MissingKernel(name.to_string()))
    }
}

/// The kernels for `stream`'s context: compiled with NVRTC and loaded on first use (about a
/// second per context), then cached for the life of the process.
pub fn kernels(stream: &Arc<CudaStream>) -> Result<Arc<Kernels>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();
    let ctx: &Arc<CudaContext> = stream.context();
    let key = ctx.cu_ctx() as usize;
    let cache = CACHE.get_or_init(Default::default);
    if let Some(k) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(k.clone());
    }
    let cc = ctx.compute_capability()?;
    if cc.0 < 8 {
        return Err(CudaError::Unsupported(format!(
            "custom kernels need compute capability 8.0 or newer, device has {}.{}",
            cc.0, cc.1
        )));
    }
    let arch = format!("compute_{}{}", cc.0, cc.1);
    let modules = compile_all(&arch)?
        .into_iter()
        .map(|(_, ptx)| ctx.load_module(ptx))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let k = Arc::new(Kernels {
        modules,
        functions: Mutex::new(HashMap::new()),
        cc,
    });
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, k.clone());
    Ok(k)
}
