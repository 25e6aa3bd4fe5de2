"""Write a synthetic, slightly learnable token file, for runs through the real token loader.

Each token is, with probability 1/2, the previous token plus one (mod the vocabulary);
otherwise a fresh draw from a Zipf-like distribution (token t about as likely as
1 / (t + 1)). So a model's loss falls below the uniform guess (ln V) by learning the
frequencies, and further by learning the "plus one" rule. The same arguments always give
the same bytes.

Run:

    python scripts/make_tokens.py /tmp/tokens.bin --tokens 100000000 --vocab 50257
    python -m jaxdist.run gpt_lm data.tokens=/tmp/tokens.bin model.vocab_size=50257
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxdist.data.tokens import TOKEN_DTYPE, llmc_header

CHUNK = 1 << 22  # tokens generated and written at a time
CONTINUE = 0.5  # the probability that a token is the previous one plus one
MAX_LLMC_TOKENS = 2**31 - 1  # llm.c's header holds the count as an int32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: output path, size, vocabulary, format and seed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the file to write")
    parser.add_argument("--tokens", type=int, required=True, help="how many tokens")
    parser.add_argument("--vocab", type=int, required=True,
                        help="vocabulary size V: tokens are in [0, V), V <= 65536")
    parser.add_argument("--format", choices=["raw", "llmc"], default="raw",
                        help="raw: nanoGPT's headerless uint16 .bin; llmc: llm.c's shard "
                             "(256-int32 header, then uint16 tokens)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.vocab <= 2**16:
        parser.error(f"--vocab {args.vocab} must be in [1, 65536] (tokens are uint16)")
    limit = MAX_LLMC_TOKENS if args.format == "llmc" else None
    if args.tokens < 0 or (limit is not None and args.tokens > limit):
        parser.error(f"--tokens {args.tokens} must be in [0, {limit or 'any'}]")
    return args


def zipf_draws(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    """`n` tokens in [0, vocab); token t has probability ln((t + 2) / (t + 1)) / ln(vocab + 1)."""
    log_uniform = np.exp(rng.random(n) * np.log(vocab + 1))  # in [1, vocab + 1)
    return np.minimum(log_uniform.astype(np.int64) - 1, vocab - 1)


def markov_chunk(draws: np.random.Generator, flips: np.random.Generator, previous: int,
                 n: int, vocab: int) -> np.ndarray:
    """The next `n` tokens after `previous`, as int64 (fresh tokens from `draws`).

    Vectorised: a token that continues its run is the run's first token plus its distance
    from it, so each token is read off the last fresh draw at or before it.
    """
    values = np.concatenate([[previous], zipf_draws(draws, n, vocab)])
    fresh = np.concatenate([[True], flips.random(n) >= CONTINUE])
    position = np.arange(n + 1)
    run_start = np.maximum.accumulate(np.where(fresh, position, 0))
    return ((values[run_start] + position - run_start) % vocab)[1:]


def synthetic_tokens(total: int, vocab: int, seed: int, chunk: int = CHUNK
                     ) -> Iterator[np.ndarray]:
    """Yield the `total` tokens in chunks of at most `chunk`, as uint16.

    The draws and the coin flips come from two streams, so the tokens do not depend on
    `chunk`.
    """
    draws, flips = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    previous = int(zipf_draws(draws, 1, vocab)[0])
    for start in range(0, total, chunk):
        tokens = markov_chunk(draws, flips, previous, min(chunk, total - start), vocab)
        previous = int(tokens[-1])
        yield tokens.astype(TOKEN_DTYPE)


def write_tokens(out: Path, total: int, vocab: int, fmt: str = "raw", seed: int = 0) -> Path:
    """Write `total` synthetic tokens to `out` as a raw `.bin` or an llm.c shard."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        if fmt == "llmc":
            llmc_header(total).tofile(f)
        for tokens in synthetic_tokens(total, vocab, seed):
            tokens.tofile(f)
    return out


def main(argv: list[str] | None = None) -> None:
    """Write the file the command line asks for and say what was written."""
    args = parse_args(argv)
    write_tokens(args.out, args.tokens, args.vocab, args.format, args.seed)
    print(f"wrote {args.tokens} tokens (vocabulary {args.vocab}, {args.format}) to {args.out}")


if __name__ == "__main__":
    main()
