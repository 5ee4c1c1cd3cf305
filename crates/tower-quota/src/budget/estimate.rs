//! Estimating what a request will cost.

use super::Cost;
use http::{Extensions, HeaderMap};

/// Estimates a request's [`Cost`] before it is sent. A closure
/// `Fn(&HeaderMap, &Extensions, Option<&[u8]>) -> Cost` is an estimator too. A [`Cost`] in the
/// request extensions always wins over the estimator.
pub trait Estimate: Send + Sync + 'static {
    /// The cost of a request with these headers, extensions and (when the body type exposes it)
    /// body bytes.
    fn estimate(&self, headers: &HeaderMap, extensions: &Extensions, body: Option<&[u8]>) -> Cost;
}

impl<F> Estimate for F
where
    F: Fn(&HeaderMap, &Extensions, Option<&[u8]>) -> Cost + Send + Sync + 'static,
{
    fn estimate(&self, headers: &HeaderMap, extensions: &Extensions, body: Option<&[u8]>) -> Cost {
        self(headers, extensions, body)
    }
}

/// The default estimator, for Messages-shaped JSON bodies (`messages`, `system`, `max_tokens`):
/// input tokens from the characters of text (one token per `chars_per_token` characters, rounded
/// up, plus 4 per message and 3 per request for the framing), output tokens reserved as
/// `max_tokens` (the most the request can use; the real usage settles it afterwards). A body it
/// cannot read costs one request and `default_max_tokens` of output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MessagesEstimator {
    /// Characters per token. Default 4, the usual rule of thumb for English text; lower it to
    /// reserve more for code or other languages.
    pub chars_per_token: f64,
    /// The output reservation when the body has no `max_tokens`. Default 4096.
    pub default_max_tokens: u64,
}

impl Default for MessagesEstimator {
    fn default() -> Self {
        Self {
            chars_per_token: 4.0,
            default_max_tokens: 4096,
        }
    }
}

impl Estimate for MessagesEstimator {
    fn estimate(&self, _: &HeaderMap, _: &Extensions, body: Option<&[u8]>) -> Cost {
        let Some(tally) = body.and_then(scan::tally) else {
            return Cost::new(0, self.default_max_tokens);
        };
        let per = self.chars_per_token.max(0.1);
        let input = (tally.chars as f64 / per).ceil() as u64 + tally.messages.saturating_mul(4) + 3;
        let output = tally.max_tokens.unwrap_or(self.default_max_tokens);
        Cost::new(input, output)
    }
}

/// One pass over a Messages body that keeps only what the estimate needs (characters of text,
/// the number of messages, `max_tokens`), without building a JSON tree: strings are counted where
/// they lie in the input, and everything else is skipped.
mod scan {
    use serde::de::{
        DeserializeSeed, Deserializer, Error, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };
    use std::fmt;

    /// What the estimate needs of a body.
    #[derive(Debug, Default, PartialEq, Eq)]
    pub(super) struct Tally {
        pub(super) chars: u64,
        pub(super) messages: u64,
        pub(super) max_tokens: Option<u64>,
    }

    /// The tally of a JSON object body, or `None` if it is not one.
    pub(super) fn tally(body: &[u8]) -> Option<Tally> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let t = de.deserialize_map(Top).ok()?;
        de.end().ok()?;
        Some(t)
    }

    /// The keys that matter, anywhere in the body.
    enum Key {
        Messages,
        System,
        MaxTokens,
        Text,
        Content,
        Other,
    }

    impl<'de> serde::Deserialize<'de> for Key {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            // As bytes: serde_json hands a key over without checking it is UTF-8 (the keys that
            // matter are ASCII; any other is skipped anyway).
            d.deserialize_bytes(KeyVisitor)
        }
    }

    struct KeyVisitor;

    impl Visitor<'_> for KeyVisitor {
        type Value = Key;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a key")
        }
        fn visit_bytes<E: Error>(self, k: &[u8]) -> Result<Key, E> {
            Ok(match k {
                b"messages" => Key::Messages,
                b"system" => Key::System,
                b"max_tokens" => Key::MaxTokens,
                b"text" => Key::Text,
                b"content" => Key::Content,
                _ => Key::Other,
            })
        }
        fn visit_str<E: Error>(self, k: &str) -> Result<Key, E> {
            self.visit_bytes(k.as_bytes())
        }
    }

    /// Skips what is left of a sequence or a map.
    fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }

    /// Values the estimate ignores count zero (and are skipped).
    macro_rules! zero_for_scalars {
        ($zero:expr) => {
            fn visit_bool<E: Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok($zero)
            }
            fn visit_i64<E: Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok($zero)
            }
            fn visit_f64<E: Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok($zero)
            }
            fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
                Ok($zero)
            }
        };
    }

    /// The top-level object.
    struct Top;

    impl<'de> Visitor<'de> for Top {
        type Value = Tally;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a Messages request object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tally, A::Error> {
            let mut t = Tally::default();
            while let Some(key) = map.next_key::<Key>()? {
                match key {
                    Key::Messages => {
                        let (n, chars) = map.next_value_seed(Messages)?;
                        t.messages = t.messages.saturating_add(n);
                        t.chars = t.chars.saturating_add(chars);
                    }
                    Key::System => t.chars = t.chars.saturating_add(map.next_value_seed(Text)?),
                    Key::MaxTokens => t.max_tokens = map.next_value_seed(MaybeU64)?,
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(t)
        }
    }

    /// `messages`: how many, and the characters of their `content`.
    struct Messages;

    impl<'de> DeserializeSeed<'de> for Messages {
        type Value = (u64, u64);
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Messages {
        type Value = (u64, u64);
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("messages")
        }
        zero_for_scalars!((0, 0));
        fn visit_u64<E: Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok((0, 0))
        }
        fn visit_str<E: Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok((0, 0))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            drain_map(map)?;
            Ok((0, 0))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let (mut n, mut chars) = (0u64, 0u64);
            while let Some(c) = seq.next_element_seed(Message)? {
                n += 1;
                chars = chars.saturating_add(c);
            }
            Ok((n, chars))
        }
    }

    /// One message: the characters of its `content`.
    struct Message;

    impl<'de> DeserializeSeed<'de> for Message {
        type Value = u64;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Message {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a message")
        }
        zero_for_scalars!(0);
        fn visit_u64<E: Error>(self, _: u64) -> Result<u64, E> {
            Ok(0)
        }
        fn visit_str<E: Error>(self, _: &str) -> Result<u64, E> {
            Ok(0)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<u64, A::Error> {
            drain_seq(seq)?;
            Ok(0)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
            let mut chars = 0u64;
            while let Some(key) = map.next_key::<Key>()? {
                match key {
                    Key::Content => chars = chars.saturating_add(map.next_value_seed(Text)?),
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(chars)
        }
    }

    /// Text: a string's characters; an array's items; an object's `text` and `content`.
    struct Text;

    impl<'de> DeserializeSeed<'de> for Text {
        type Value = u64;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Text {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("text")
        }
        zero_for_scalars!(0);
        fn visit_u64<E: Error>(self, _: u64) -> Result<u64, E> {
            Ok(0)
        }
        fn visit_str<E: Error>(self, s: &str) -> Result<u64, E> {
            Ok(s.chars().count() as u64)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
            let mut chars = 0u64;
            while let Some(c) = seq.next_element_seed(Text)? {
                chars = chars.saturating_add(c);
            }
            Ok(chars)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
            let mut chars = 0u64;
            while let Some(key) = map.next_key::<Key>()? {
                match key {
                    Key::Text | Key::Content => {
                        chars = chars.saturating_add(map.next_value_seed(Text)?);
                    }
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(chars)
        }
    }

    /// `max_tokens`: a whole number, else nothing.
    struct MaybeU64;

    impl<'de> DeserializeSeed<'de> for MaybeU64 {
        type Value = Option<u64>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for MaybeU64 {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("max_tokens")
        }
        zero_for_scalars!(None);
        fn visit_u64<E: Error>(self, n: u64) -> Result<Self::Value, E> {
            Ok(Some(n))
        }
        fn visit_str<E: Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            drain_seq(seq)?;
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            drain_map(map)?;
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_bodies() {
        let e = MessagesEstimator::default();
        let body = br#"{"model":"m","max_tokens":300,"system":"abcd",
            "messages":[{"role":"user","content":"abcdefgh"},
                        {"role":"assistant","content":[{"type":"text","text":"abcd"}]}]}"#;
        let c = e.estimate(&HeaderMap::new(), &Extensions::new(), Some(body));
        assert_eq!(c, Cost::new(4 + 8 + 3, 300));
        let c = e.estimate(&HeaderMap::new(), &Extensions::new(), Some(b"not json"));
        assert_eq!(c, Cost::new(0, 4096));
        let c = e.estimate(&HeaderMap::new(), &Extensions::new(), None);
        assert_eq!(c.requests, 1);
    }

    /// The estimate as the crate first computed it, over a whole `serde_json::Value` tree: the
    /// reference the one-pass scanner must agree with.
    fn reference(e: &MessagesEstimator, body: &[u8]) -> Cost {
        use serde_json::Value;
        fn text_chars(v: &Value) -> u64 {
            match v {
                Value::String(s) => s.chars().count() as u64,
                Value::Array(items) => items.iter().map(text_chars).sum(),
                Value::Object(o) => ["text", "content"]
                    .iter()
                    .filter_map(|k| o.get(*k))
                    .map(text_chars)
                    .sum(),
                _ => 0,
            }
        }
        let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(body) else {
            return Cost::new(0, e.default_max_tokens);
        };
        let messages = o.get("messages").and_then(Value::as_array);
        let chars: u64 = messages.map_or(0, |m| {
            m.iter()
                .map(|msg| msg.get("content").map_or(0, text_chars))
                .sum()
        }) + o.get("system").map_or(0, text_chars);
        let input = (chars as f64 / e.chars_per_token).ceil() as u64
            + 4 * messages.map_or(0, Vec::len) as u64
            + 3;
        let output = o
            .get("max_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(e.default_max_tokens);
        Cost::new(input, output)
    }

    fn json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::{Value, json};
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u32>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            "[a-z\\u{e9}\\u{1F600}\"\\\\ ]{0,12}".prop_map(Value::from),
        ];
        let key = prop_oneof![
            Just("text".to_owned()),
            Just("content".to_owned()),
            Just("type".to_owned()),
            Just("role".to_owned()),
            "[a-z]{1,6}",
        ];
        let tree = leaf.prop_recursive(4, 32, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                proptest::collection::btree_map(key.clone(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        (
            proptest::option::of(tree.clone()),
            proptest::option::of(tree.clone()),
            proptest::option::of(tree),
        )
            .prop_map(|(messages, system, max)| {
                let mut o = json!({"model": "m"});
                if let Some(m) = messages {
                    o["messages"] = m;
                }
                if let Some(s) = system {
                    o["system"] = s;
                }
                if let Some(m) = max {
                    o["max_tokens"] = m;
                }
                o
            })
    }

    proptest::proptest! {
        #[test]
        fn the_one_pass_scan_agrees_with_the_tree(body in json()) {
            let e = MessagesEstimator::default();
            let bytes = serde_json::to_vec(&body).unwrap();
            let got = e.estimate(&HeaderMap::new(), &Extensions::new(), Some(&bytes));
            proptest::prop_assert_eq!(got, reference(&e, &bytes));
        }

        #[test]
        fn any_bytes_give_an_estimate(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let e = MessagesEstimator::default();
            let got = e.estimate(&HeaderMap::new(), &Extensions::new(), Some(&bytes));
            proptest::prop_assert_eq!(got, reference(&e, &bytes));
        }
    }
}
