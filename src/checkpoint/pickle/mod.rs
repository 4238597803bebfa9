//! A restricted unpickler for the files `torch.save` writes, and the pickler for the files this
//! crate writes back.
//!
//! It understands the opcodes of pickle protocols 2 to 5 that hold data (no `exec`-like opcodes)
//! and resolves only an allow-list of globals: `collections.OrderedDict`, `torch._utils`'s tensor
//! rebuilders, the typed storage classes, and a few plain helpers. Any other global (`os.system`,
//! `builtins.eval`, ...) fails the load with an error naming it; nothing from the file is ever
//! executed. Persistent ids (PyTorch's storages) are handed back as values for the caller to
//! resolve.
//!
//! Written for this crate: no maintained crate does this restricted job while also building
//! PyTorch's tensor records (serde-pickle refuses persistent ids and `REDUCE` of globals).

mod globals;
pub mod opcodes;
mod pickler;
mod unpickler;
mod value;

pub use pickler::pickle_state_dict;
pub use unpickler::unpickle;
pub use value::{StorageRef, TensorRef, Value};
