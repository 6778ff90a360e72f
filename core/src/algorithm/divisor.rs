//! Division by a divisor fixed when a rule compiles.
//!
//! Every decision divides by the rule's period, rate or window to fill the outcome's header
//! fields and to find the current window. A u128 division is a library call and even a u64
//! hardware division costs tens of cycles, which made these divisions most of a decision's cost.
//! The divisor never changes after compile time, so its reciprocal is precomputed (strength
//! reduction: a multiply and a shift per division), and numerators that fit in u64 — every
//! realistic one — take that path; larger ones fall back to plain u128 division.

use strength_reduce::StrengthReducedU64;

/// A non-zero divisor with its precomputed reciprocal.
#[derive(Clone, Copy)]
pub(crate) struct Divisor {
    value: u64,
    reduced: StrengthReducedU64,
}

impl PartialEq for Divisor {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl Eq for Divisor {}

impl core::fmt::Debug for Divisor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.value.fmt(f) // the reciprocal is an implementation detail
    }
}

impl Divisor {
    /// The divisor `value`; 0 is read as 1 (callers reject 0 before: this only keeps the
    /// reciprocal's constructor from panicking).
    pub fn new(value: u64) -> Self {
        let value = value.max(1);
        Self {
            value,
            reduced: StrengthReducedU64::new(value),
        }
    }

    /// The divisor itself.
    pub fn get(&self) -> u64 {
        self.value
    }

    /// `n / self` for a u64 numerator.
    #[inline]
    pub fn div_u64(&self, n: u64) -> u64 {
        n / self.reduced
    }

    /// `n / self`, rounded down.
    #[inline]
    pub fn div(&self, n: u128) -> u128 {
        match u64::try_from(n) {
            Ok(small) => u128::from(small / self.reduced),
            Err(_) => n / u128::from(self.value),
        }
    }

    /// `n / self`, rounded up.
    #[inline]
    pub fn div_ceil(&self, n: u128) -> u128 {
        match u64::try_from(n) {
            Ok(small) => {
                let (q, r) = StrengthReducedU64::div_rem(small, self.reduced);
                u128::from(q) + u128::from(r != 0)
            }
            Err(_) => n.div_ceil(u128::from(self.value)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_plain_division_on_both_paths() {
        for d in [1u64, 3, 7, 1_000_000_000, u64::MAX] {
            let div = Divisor::new(d);
            for n in [
                0u128,
                1,
                6,
                7,
                8,
                u128::from(u64::MAX),
                u128::from(u64::MAX) + 5,
                u128::MAX,
            ] {
                assert_eq!(div.div(n), n / u128::from(d), "{n} / {d}");
                assert_eq!(
                    div.div_ceil(n),
                    n.div_ceil(u128::from(d)),
                    "{n} / {d} rounded up"
                );
            }
        }
        assert_eq!(Divisor::new(0).get(), 1);
    }
}
