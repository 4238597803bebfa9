//! Library enums on the command line by their serde names, so that the library's types need no
//! clap derive: `#[arg(long, value_parser = serde_enum::<Schedule>())]`.

use std::ffi::OsStr;
use std::marker::PhantomData;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use serde::de::value::Error as DeError;
use serde::de::{DeserializeOwned, Error as _, IntoDeserializer, Visitor};

/// Parses a unit-variant enum that derives `Deserialize`; the possible values (in `--help` and in
/// errors) are its serde names.
#[derive(Clone)]
pub struct SerdeEnum<T>(PhantomData<fn() -> T>);

pub fn serde_enum<T>() -> SerdeEnum<T> {
    SerdeEnum(PhantomData)
}

impl<T: DeserializeOwned + Clone + Send + Sync + 'static> TypedValueParser for SerdeEnum<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        // clap's own check first, for its usual "invalid value ... [possible values: ...]".
        let name = PossibleValuesParser::new(variants::<T>()).parse_ref(cmd, arg, value)?;
        T::deserialize(name.as_str().into_deserializer()).map_err(|e: DeError| {
            clap::Error::raw(clap::error::ErrorKind::InvalidValue, e).with_cmd(cmd)
        })
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(variants::<T>().iter().map(PossibleValue::new)))
    }
}

/// The serde names of `T`'s variants, as its derived `Deserialize` hands them to
/// `deserialize_enum`.
pub fn variants<T: DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Default)]
    struct Names(&'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for &mut Names {
        type Error = DeError;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, DeError> {
            Err(DeError::custom("not an enum"))
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _name: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, DeError> {
            self.0 = variants;
            Err(DeError::custom("only the names are read"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
            ignored_any
        }
    }

    let mut names = Names::default();
    // Always an error: the names are what it leaves behind.
    let _ = T::deserialize(&mut names);
    names.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use residual::backend::AutocastDtype;
    use residual::data::DataFormat;
    use residual::train::Schedule;

    #[test]
    fn names_are_the_serde_names() {
        assert_eq!(variants::<Schedule>(), ["step", "cosine"]);
        assert_eq!(
            variants::<DataFormat>(),
            ["idx", "cifar10", "cifar100", "image-folder"]
        );
        assert_eq!(variants::<AutocastDtype>(), ["fp16", "bf16"]);
        assert!(variants::<i64>().is_empty());
    }

    #[test]
    fn parses_by_name_and_rejects_others() {
        let cmd = clap::Command::new("t");
        let parse = |v: &str| serde_enum::<DataFormat>().parse_ref(&cmd, None, OsStr::new(v));
        assert_eq!(parse("cifar100").unwrap(), DataFormat::Cifar100);
        let err = parse("Cifar100").unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
        assert!(
            err.to_string()
                .contains("[possible values: idx, cifar10, cifar100, image-folder]"),
            "{err}"
        );
    }
}
