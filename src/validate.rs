//! Checks of config values whose errors name the field: `depth: must be at least 1, got 0`.

use std::fmt::Display;

use anyhow::{bail, Result};

/// Fails at the first `(field, value)` below `min`.
pub fn at_least<F: Display>(min: i64, fields: impl IntoIterator<Item = (F, i64)>) -> Result<()> {
    for (field, value) in fields {
        if value < min {
            bail!("{field}: must be at least {min}, got {value}");
        }
    }
    Ok(())
}

/// Fails at the first `(field, p)` outside `[0, 1)`, or `[0, 1]` when `one_allowed` (NaN fails).
pub fn probability<F: Display>(
    one_allowed: bool,
    fields: impl IntoIterator<Item = (F, f64)>,
) -> Result<()> {
    for (field, p) in fields {
        let fits = p >= 0.0 && (p < 1.0 || (one_allowed && p == 1.0));
        if !fits {
            let end = if one_allowed { "1]" } else { "1)" };
            bail!("{field}: must be in [0, {end}, got {p}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_first_bad_field() {
        assert!(at_least(1, [("a", 1), ("b", 5)]).is_ok());
        let err = at_least(1, [("a", 1), ("b", 0), ("c", -1)]).unwrap_err();
        assert_eq!(err.to_string(), "b: must be at least 1, got 0");
        let err = at_least(0, [(format!("layers[{}]", 2), -3)]).unwrap_err();
        assert_eq!(err.to_string(), "layers[2]: must be at least 0, got -3");

        assert!(probability(false, [("p", 0.0), ("q", 0.999)]).is_ok());
        let err = probability(false, [("p", 1.0)]).unwrap_err();
        assert_eq!(err.to_string(), "p: must be in [0, 1), got 1");
        assert!(probability(true, [("p", 1.0)]).is_ok());
        let err = probability(true, [("p", f64::NAN)]).unwrap_err();
        assert_eq!(err.to_string(), "p: must be in [0, 1], got NaN");
        assert!(probability(true, [("p", -0.5)]).is_err());
    }
}
