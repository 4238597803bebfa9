//! Element types of checkpoint tensors. Every name a dtype has (tch kind, safetensors dtype,
//! PyTorch storage class) and its size come from one table, [`DTYPES`].

use anyhow::{bail, Result};
use safetensors::Dtype as St;
use tch::Kind;

/// Element types of PyTorch storages that checkpoints hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

/// One row of [`DTYPES`].
#[derive(Debug)]
pub struct DTypeNames {
    pub dtype: DType,
    pub kind: Kind,
    pub safetensors: St,
    /// The `torch.*Storage` class that `torch.save` names for it.
    pub storage: &'static str,
    /// Bytes per element.
    pub size: usize,
}

const fn row(dtype: DType, kind: Kind, safetensors: St, storage: &'static str) -> DTypeNames {
    let size = match dtype {
        DType::F64 | DType::I64 => 8,
        DType::F32 | DType::I32 => 4,
        DType::F16 | DType::BF16 | DType::I16 => 2,
        DType::I8 | DType::U8 | DType::Bool => 1,
    };
    DTypeNames {
        dtype,
        kind,
        safetensors,
        storage,
        size,
    }
}

/// Every dtype with its names, in the order of [`DType`]'s variants.
pub const DTYPES: [DTypeNames; 10] = [
    row(DType::F64, Kind::Double, St::F64, "DoubleStorage"),
    row(DType::F32, Kind::Float, St::F32, "FloatStorage"),
    row(DType::F16, Kind::Half, St::F16, "HalfStorage"),
    row(DType::BF16, Kind::BFloat16, St::BF16, "BFloat16Storage"),
    row(DType::I64, Kind::Int64, St::I64, "LongStorage"),
    row(DType::I32, Kind::Int, St::I32, "IntStorage"),
    row(DType::I16, Kind::Int16, St::I16, "ShortStorage"),
    row(DType::I8, Kind::Int8, St::I8, "CharStorage"),
    row(DType::U8, Kind::Uint8, St::U8, "ByteStorage"),
    row(DType::Bool, Kind::Bool, St::BOOL, "BoolStorage"),
];

impl DType {
    fn names(self) -> &'static DTypeNames {
        &DTYPES[self as usize]
    }

    fn find(matches: impl Fn(&DTypeNames) -> bool) -> Option<Self> {
        DTYPES.iter().find(|d| matches(d)).map(|d| d.dtype)
    }

    /// The tch kind of tensors of this type.
    pub fn kind(self) -> Kind {
        self.names().kind
    }

    /// The storage dtype of a tch kind, where a checkpoint can hold it.
    pub fn from_kind(kind: Kind) -> Result<Self> {
        match Self::find(|d| d.kind == kind) {
            Some(dtype) => Ok(dtype),
            None => bail!("cannot store tensors of kind {kind:?}"),
        }
    }

    pub fn safetensors(self) -> St {
        self.names().safetensors
    }

    pub fn from_safetensors(dtype: St) -> Option<Self> {
        Self::find(|d| d.safetensors == dtype)
    }

    /// The `torch.*Storage` class name of this type.
    pub fn storage_name(self) -> &'static str {
        self.names().storage
    }

    pub fn from_storage_name(name: &str) -> Option<Self> {
        Self::find(|d| d.storage == name)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        self.names().size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_indexed_by_variant_and_every_name_maps_back() {
        for (i, row) in DTYPES.iter().enumerate() {
            assert_eq!(row.dtype as usize, i);
            assert_eq!(DType::from_kind(row.kind).unwrap(), row.dtype);
            assert_eq!(DType::from_safetensors(row.safetensors), Some(row.dtype));
            assert_eq!(DType::from_storage_name(row.storage), Some(row.dtype));
            assert_eq!(row.safetensors.bitsize(), row.size * 8);
        }
        assert!(DType::from_kind(Kind::ComplexFloat).is_err());
        assert_eq!(DType::from_storage_name("ComplexFloatStorage"), None);
    }
}
