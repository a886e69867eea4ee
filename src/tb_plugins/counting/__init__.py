"""Offline token counting for chat requests: the input side of every estimate.

OpenAI models are counted exactly with tiktoken, following OpenAI's published rules (the
openai-cookbook notebook "How to count tokens with tiktoken"); other model families (Claude,
Gemini, Llama, Mistral, unknown names) are approximated from the cl100k_base count times a
margin. :meth:`TokenCounter.is_exact` says which kind a model gets. tiktoken never downloads:
encodings load from hash-checked local files, and without one counts fall back to a byte
estimate with one warning.

A module per concept:

* :mod:`~tb_plugins.counting.counter`: :class:`TokenCounter`, :func:`default_counter`,
  :func:`count_tokens` and the :class:`Tokenizer` protocol, which put the parts together;
* :mod:`~tb_plugins.counting.families`: which encoding and tool constants a model gets;
* :mod:`~tb_plugins.counting.messages`: the chat format (per-message overhead, names, tool
  calls, tool definitions);
* :mod:`~tb_plugins.counting.media`: images, audio and files, sized from their headers;
* :mod:`~tb_plugins.counting.cache`: the counts a counter keeps between calls;
* :mod:`~tb_plugins.counting.encoders` and :mod:`~tb_plugins.counting.bpe_files`: tiktoken
  encodings loaded offline, or the byte estimate;
* :mod:`~tb_plugins.counting._fast`: the speed tricks, each justified by
  ``benchmarks/bench_counting.py``.

Importing this package loads neither tiktoken nor LiteLLM; the first count does.

Example:
    >>> from tb_plugins.counting import count_tokens
    >>> count_tokens("gpt-4o", [{"role": "user", "content": "Hello!"}])
    9
"""

from tb_plugins.counting.counter import TokenCounter, Tokenizer, count_tokens, default_counter
from tb_plugins.counting.media import image_tokens

__all__ = ["TokenCounter", "Tokenizer", "count_tokens", "default_counter", "image_tokens"]
