//! The OpenUni head (docs/models.md, "Conditioning"): the learned meta-queries appended to every
//! prompt's token embeddings, the LLM ([`qwen2`]) on all sequences packed into one pass, its last
//! Q hidden states after the final norm, the [`connector`], and the projector
//! `Linear(D -> caption_channels)` whose output is SANA's prompt embeddings.
//!
//! An OpenUni checkpoint holds `meta_queries` [Q, D], `connector.*` and `projector.*`; a
//! fine-tuned one (stage 2) also the whole SANA transformer under `transformer.*`.

use openuni_graph::{Graph, GraphBuilder, OutputName, ValueId};
use openuni_tensor::TensorSource;

use crate::connector::{self, ConnectorConfig};
use crate::nn::{linear, Scope};
use crate::qwen2::{self, Qwen2Config};
use crate::{ModelError, Result};

/// The meta-query table [Q, D] in the checkpoint.
pub const META_QUERIES: &str = "meta_queries";
/// Key prefixes of the connector and the projector in the checkpoint (the rest of the
/// conditioning graph's weights are the LLM's).
pub const CONNECTOR_PREFIX: &str = "connector.";
pub const PROJECTOR_PREFIX: &str = "projector.";
/// Key prefix of the fine-tuned SANA transformer in a stage-2 checkpoint, and the key by which
/// such a checkpoint is recognised (docs/models.md, "Variants").
pub const TRANSFORMER_PREFIX: &str = "transformer.";
pub const FINETUNED_PROBE: &str = "transformer.proj_out.weight";

/// The conditioning graph's input: every sequence's token ids with its meta-queries' ids, packed
/// [1, T] ([`Head::input_ids`]).
pub const INPUT_IDS: &str = "input_ids";
/// The LLM's last Q hidden states of every sequence after the final norm [S, Q, D].
pub const HIDDEN: OutputName = OutputName("hidden");
/// The connector's output [S, Q, D].
pub const CONNECTOR: OutputName = OutputName("connector");
/// The projector's output, SANA's `encoder_hidden_states` [S, Q, caption_channels].
pub const PROMPT_EMBEDS: OutputName = OutputName("prompt_embeds");

/// What the conditioning graph is built from: the LLM and connector configs, where the LLM's
/// weights live (`model.` or `language_model.model.`), the number of meta-queries and SANA's
/// caption width.
pub struct Head<'a> {
    pub llm: &'a Qwen2Config,
    pub llm_prefix: &'a str,
    pub connector: &'a ConnectorConfig,
    pub num_queries: usize,
    pub caption_channels: usize,
}

/// The conditioning graph's values (see [`Head::build`]).
pub struct HeadOutputs {
    pub hidden: ValueId,
    pub connector: ValueId,
    pub prompt_embeds: ValueId,
}

/// The number of meta-queries Q from the checkpoint's table, which must be [Q, D] with D the
/// LLM's hidden size.
pub fn num_queries(checkpoint: &dyn TensorSource, llm: &Qwen2Config) -> Result<usize> {
    let mq = checkpoint.shape_of(META_QUERIES)?;
    if mq.rank() != 2 || mq.dims()[1] != llm.hidden_size || mq.dims()[0] == 0 {
        return Err(ModelError::Config {
            path: checkpoint.origin(),
            msg: format!(
                "`{META_QUERIES}` has shape {mq}, expected [Q, {}] (the LLM's hidden size)",
                llm.hidden_size
            ),
        });
    }
    Ok(mq.dims()[0])
}

/// The lengths of the 2N sequences of N prompts (cond ids, uncond ids) in row order
/// [uncond_0..N-1, cond_0..N-1] (diffusers' CFG order), each with the Q meta-queries appended:
/// the packed segments of the conditioning graph.
pub fn segments(prompts: &[(&[u32], &[u32])], num_queries: usize) -> Vec<usize> {
    prompts
        .iter()
        .map(|p| p.1.len())
        .chain(prompts.iter().map(|p| p.0.len()))
        .map(|l| l + num_queries)
        .collect()
}

impl Head<'_> {
    /// The conditioning graph's input [`INPUT_IDS`] [1, T] for N prompts (cond ids, uncond ids):
    /// each sequence's token ids, then the Q meta-queries as ids V..V+Q (V the LLM's vocabulary:
    /// [`Op::EmbeddingGather`](openuni_graph::Op::EmbeddingGather) reads them from the
    /// meta-query table), in the order of [`segments`], as integer-valued f32 (exact: V + Q is far
    /// below 2^24). Token ids outside the vocabulary are refused here, before anything runs.
    pub fn input_ids(&self, prompts: &[(&[u32], &[u32])]) -> Result<Vec<f32>> {
        let (q, vocab) = (self.num_queries, self.llm.vocab_size);
        let mut ids = Vec::with_capacity(segments(prompts, q).iter().sum());
        for seq in prompts
            .iter()
            .map(|p| p.1)
            .chain(prompts.iter().map(|p| p.0))
        {
            if let Some(bad) = seq.iter().find(|&&i| i as usize >= vocab) {
                return Err(ModelError::Invalid(format!(
                    "token id {bad} is outside the LLM's vocabulary of {vocab}"
                )));
            }
            ids.extend(seq.iter().map(|&i| i as f32));
            ids.extend((vocab..vocab + q).map(|i| i as f32));
        }
        Ok(ids)
    }

    /// The conditioning on `x` [1, T, D], packed sequences of `segments` tokens (each ending in
    /// the Q meta-queries): the LLM with causal attention inside each sequence and no padding, the
    /// last Q states of every sequence after the final norm, the connector on all of them at
    /// once, the projector.
    pub fn build(
        &self,
        b: &mut GraphBuilder,
        x: ValueId,
        segments: &[usize],
    ) -> Result<HeadOutputs> {
        let (d, q) = (self.llm.hidden_size, self.num_queries);
        if let Some(short) = segments.iter().find(|&&l| l < q) {
            return Err(ModelError::Invalid(format!(
                "a packed sequence of {short} tokens cannot hold the {q} meta-queries"
            )));
        }
        let o = qwen2::build_packed(
            b,
            self.llm,
            &Scope::new(self.llm_prefix),
            x,
            segments,
            "llm",
        )?;
        let ends: Vec<usize> = segments
            .iter()
            .scan(0, |at, &l| {
                *at += l;
                Some(*at - q)
            })
            .collect();
        let hidden = b.gather_tokens("queries", o.hidden_states, &ends, q)?;
        let layers = connector::build(
            b,
            self.connector,
            &Scope::new(CONNECTOR_PREFIX),
            hidden,
            "connector",
        )?;
        let connector = *layers.last().unwrap_or(&hidden);
        let prompt_embeds = linear(
            b,
            &Scope::new(PROJECTOR_PREFIX),
            connector,
            d,
            self.caption_channels,
            true,
        )?;
        Ok(HeadOutputs {
            hidden,
            connector,
            prompt_embeds,
        })
    }

    /// The conditioning graph on packed sequences of `segments` tokens: input [`INPUT_IDS`],
    /// gathered on the device from the LLM's embedding table and the meta-queries, outputs
    /// [`HIDDEN`], [`CONNECTOR`] and [`PROMPT_EMBEDS`].
    pub fn graph(&self, segments: &[usize]) -> Result<Graph> {
        let total: usize = segments.iter().sum();
        let (d, q) = (self.llm.hidden_size, self.num_queries);
        let mut b = GraphBuilder::new();
        let ids = b.input(INPUT_IDS, [1, total])?;
        let table = b.weight(
            &Scope::new(self.llm_prefix)
                .pp("embed_tokens")
                .name("weight"),
            [self.llm.vocab_size, d],
        )?;
        let queries = b.weight(META_QUERIES, [q, d])?;
        let x = b.embedding_gather("embed_tokens", ids, table, Some(queries))?;
        let o = self.build(&mut b, x, segments)?;
        b.mark(HIDDEN, o.hidden)?;
        b.mark(CONNECTOR, o.connector)?;
        b.mark(PROMPT_EMBEDS, o.prompt_embeds)?;
        Ok(b.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host side of the device gather: ids in row order [uncond, cond] with the meta-queries'
    /// ids V..V+Q after each sequence; an id outside the vocabulary is refused before anything
    /// runs, naming it; the graph reads the ids and gathers from the two tables.
    #[test]
    fn input_ids_append_the_meta_query_ids_and_refuse_ids_outside_the_vocabulary() {
        let llm: Qwen2Config = serde_json::from_value(serde_json::json!({
            "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 10, "rope_theta": 10000.0
        }))
        .unwrap();
        let connector: ConnectorConfig =
            serde_json::from_value(serde_json::json!({"hidden_size": 8, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1})).unwrap();
        let head = Head {
            llm: &llm,
            llm_prefix: "model.",
            connector: &connector,
            num_queries: 2,
            caption_channels: 4,
        };
        let prompts: [(&[u32], &[u32]); 2] = [(&[1, 2, 3], &[9]), (&[0], &[4, 5])];
        let ids = head.input_ids(&prompts).unwrap();
        assert_eq!(
            ids,
            [9., 10., 11., 4., 5., 10., 11., 1., 2., 3., 10., 11., 0., 10., 11.]
        );
        let e = head.input_ids(&[(&[1, 10], &[0])]).unwrap_err().to_string();
        assert!(
            e.contains("token id 10") && e.contains("vocabulary of 10"),
            "{e}"
        );

        let g = head.graph(&segments(&prompts, 2)).unwrap();
        let (id, _) = g
            .inputs()
            .find(|(_, n)| *n == INPUT_IDS)
            .expect("the ids input");
        assert_eq!(g.shape(id).dims(), [1, ids.len()]);
        let gather = g
            .nodes
            .iter()
            .find(|n| n.op.name() == "embedding_gather")
            .expect("the gather node");
        let read: Vec<&str> = gather
            .op
            .inputs()
            .iter()
            .filter_map(|&i| g.weights().find(|(w, _)| *w == i).map(|(_, n)| n))
            .collect();
        assert_eq!(read, ["model.embed_tokens.weight", META_QUERIES]);
    }
}
