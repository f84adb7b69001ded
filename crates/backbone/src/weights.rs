//! A state dict being consumed by a model under construction, and batch-norm folding.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{BackboneError, Result};

/// A state dict (`key → tensor`) from which a model takes its weights, checking each shape.
pub(crate) struct Weights<'a> {
    /// The checkpoint, named in errors.
    pub(crate) path: &'a Path,
    /// The tensors by state-dict key.
    pub(crate) tensors: HashMap<String, Tensor>,
    /// The device the model's weights end up on.
    pub(crate) device: &'a Device,
}

impl Weights<'_> {
    /// Fetches a weight as f32 on the CPU, checking its shape.
    pub(crate) fn get(&mut self, key: &str, expected: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(key)
            .ok_or_else(|| BackboneError::MissingWeight {
                path: self.path.to_path_buf(),
                key: key.to_string(),
                expected: expected.to_vec(),
            })?;
        if t.dims() != expected {
            return Err(BackboneError::ShapeMismatch {
                path: self.path.to_path_buf(),
                key: key.to_string(),
                expected: expected.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
    }

    /// Loads the convolution weight `{conv}.weight` of shape `shape` (C_out first) and the batch
    /// norm `{bn}.{weight,bias,running_mean,running_var}`, and folds the batch norm into the
    /// convolution.
    ///
    /// In inference mode batch norm is `γ (y − μ) / √(σ² + ε) + β` per output channel, so with
    /// `s = γ / √(σ² + ε)` the unit equals a convolution with weight `W · s` and bias `β − μ · s`.
    /// The folding is computed in f64 and rounded once to f32. Returns the folded weight (in
    /// `shape`) and bias (C_out), both on the target device.
    pub(crate) fn conv_bn(
        &mut self,
        conv: &str,
        bn: &str,
        shape: &[usize],
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        let c_out = shape[0];
        let weight = self.get(&format!("{conv}.weight"), shape)?;
        let gamma = self.get(&format!("{bn}.weight"), &[c_out])?;
        let beta = self.get(&format!("{bn}.bias"), &[c_out])?;
        let mean = self.get(&format!("{bn}.running_mean"), &[c_out])?;
        let var = self.get(&format!("{bn}.running_var"), &[c_out])?;
        let scale = (gamma.to_dtype(DType::F64)? / (var.to_dtype(DType::F64)? + eps)?.sqrt()?)?;
        let mut scale_shape = vec![1usize; shape.len()];
        scale_shape[0] = c_out;
        let weight = weight
            .to_dtype(DType::F64)?
            .broadcast_mul(&scale.reshape(scale_shape)?)?
            .to_dtype(DType::F32)?;
        let bias = (beta.to_dtype(DType::F64)? - (mean.to_dtype(DType::F64)? * scale)?)?
            .to_dtype(DType::F32)?;
        Ok((weight.to_device(self.device)?, bias.to_device(self.device)?))
    }
}
