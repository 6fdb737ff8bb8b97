"""Why an answer came out: lookback ratios and a hallucination probe, attribution to context tokens, head views.

Everything here reads attention block by block through transformers' ``AttentionInterface`` (as
:mod:`headwise.capture` does), so no ``n x n`` attention map is ever held and the tools run at 8K tokens:

- :mod:`headwise.explain.lookback`: the lookback ratio of every head at every generated token (Lookback Lens,
  Chuang et al. 2024) and the logistic-regression probe that flags unsupported spans;
- :mod:`headwise.explain.rollout`: attention rollout carried back as a row vector, and attention flow for short
  inputs (Abnar and Zuidema 2020), shown as highlighted context text;
- :mod:`headwise.explain.headview`: per head, a joint 2-D embedding of its queries and keys (AttentionViz, Yeh et
  al. 2023) and the attention of chosen query tokens over a long context.
"""
