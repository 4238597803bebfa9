//! A restricted unpickler for the files `torch.save` and `torch.jit.save` write, and the pickler
//! for the files this crate writes back.
//!
//! It understands the opcodes of pickle protocols 2 to 5 that hold data and build objects, and
//! never imports or calls anything from the file. PyTorch's tensor rebuilders, `OrderedDict` and
//! sets are implemented in Rust ([`globals`]); any other class (`argparse.Namespace`, an
//! `nn.Module`, a user's class) becomes an inert [`Object`] recording its class name, arguments
//! and state, which no opcode can call; the few globals only a hostile file names (`os.system`,
//! `builtins.eval`, ...) fail the load with an error naming them. Persistent ids (PyTorch's
//! storages) are handed back as values for the caller to resolve.
//!
//! Written for this crate: no maintained crate does this restricted job while also building
//! PyTorch's tensor records (serde-pickle refuses persistent ids and `REDUCE` of globals).

mod globals;
pub mod opcodes;
mod pickler;
mod unpickler;
mod value;

pub use pickler::{pickle_nested_state_dicts, pickle_state_dict, SpecGroup, TensorSpec};
pub use unpickler::unpickle;
pub use value::{entry, Object, StorageRef, TensorRef, Value};
