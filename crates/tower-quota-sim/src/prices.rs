//! What the simulator's token counts would cost: list prices per model family, the one table the
//! demo and the benchmark read.
//!
//! These are Anthropic's published list prices for the current models of each family when this
//! table was written, mid-2026 (dollars per million tokens: Opus 5 in / 25 out, Sonnet 3 / 15,
//! Haiku 1 / 5),
//! matched on the family's name in the model id. They age: check anthropic.com/pricing before
//! quoting a cost. The Message Batches API costs half of either price, as Anthropic documents.
//! Prompt caching, long-context and regional pricing are left out.

/// Dollars per million tokens, at Messages prices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Price {
    /// Per million input tokens.
    pub input: f64,
    /// Per million output tokens.
    pub output: f64,
}

impl Price {
    /// The list price of `model`'s family (`opus`, `sonnet` or `haiku` in its id); a model of no
    /// known family is priced as Sonnet.
    pub fn of(model: &str) -> Price {
        let (input, output) = if model.contains("opus") {
            (5.0, 25.0)
        } else if model.contains("haiku") {
            (1.0, 5.0)
        } else {
            (3.0, 15.0)
        };
        Price { input, output }
    }

    /// What these tokens cost through the Messages API, in dollars.
    pub fn messages(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input + output_tokens as f64 * self.output) / 1e6
    }

    /// What these tokens cost through the Message Batches API (half), in dollars.
    pub fn batch(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        self.messages(input_tokens, output_tokens) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_the_batch_discount() {
        assert_eq!(Price::of("claude-opus-4-5").input, 5.0);
        assert_eq!(Price::of("claude-haiku-4-5").output, 5.0);
        let sonnet = Price::of("claude-sonnet-5-5");
        assert_eq!(sonnet, Price::of("some-unknown-model"));
        // A million in and a million out: 3 + 15 dollars, half in a batch.
        assert_eq!(sonnet.messages(1_000_000, 1_000_000), 18.0);
        assert_eq!(sonnet.batch(1_000_000, 1_000_000), 9.0);
    }
}
