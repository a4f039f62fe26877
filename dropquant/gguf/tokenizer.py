"""A model's tokenizer in a GGUF file, as llama.cpp reads it: carried over from a GGUF source, or written from a
Hugging Face tokenizer (byte-level BPE or a Llama HF tokenizer), as llama.cpp's convert_hf_to_gguf.py writes it."""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

from dropquant.errors import DropquantError
from dropquant.gguf.header import read_metadata

# tokenizer.ggml.pre for a byte-level BPE tokenizer, found as llama.cpp's convert_hf_to_gguf.py does:
# sha256 of the token ids of CHKTXT. Entries copied from llama.cpp (conversion/base.py) for the
# model families dropquant supports; anything else should come from a GGUF source or llama.cpp's converter.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
BPE_PRE_BY_HASH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # abacusai/Smaug-Llama-3-70B-Instruct
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # evilfreelancer/ruGPT3XL
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",  # mistral-community/pixtral-12b
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-ai/deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-ai/deepseek-coder-6.7b-base
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # tiiuae/Falcon3-7B-Base
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",  # LumiOpen/Viking-7B
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",  # sapienzanlp/Minerva-7B-base-v1.0
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
}


def copy_tokenizer(w, source_gguf: str | Path) -> None:
    """Carry every tokenizer.* key (vocabulary, merges, special ids, chat template) over from a GGUF."""
    import gguf

    fields = read_metadata(source_gguf, "tokenizer.")
    if not fields:
        raise DropquantError(f"{source_gguf}: no tokenizer.* keys to carry over")
    for key, (value, vtype, subtype) in fields.items():
        if subtype is None:
            w.add_key_value(key, value, gguf.GGUFValueType(vtype))
        else:
            w.add_key_value(key, value, gguf.GGUFValueType(vtype), sub_type=gguf.GGUFValueType(subtype))


# The split regexes of tokenizer.json files whose llama.cpp pre-tokenizer is known, as transformers writes them.
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Same regex, two llama.cpp names: llama-bpe merges whole-word tokens first (tokenizers' ignore_merges), smaug-bpe
# does not.
LLAMA3_PRE = {True: "llama-bpe", False: "smaug-bpe"}


def chkhsh(tokenizer) -> str:
    """convert_hf_to_gguf.py's fingerprint: sha256 of the ids of CHKTXT, special tokens added as the tokenizer adds them."""
    return sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


def bpe_pre(tokenizer) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer: llama.cpp's hash table first, as its converter does,
    then what the tokenizer's pipeline is, for the pre-tokenizers of the families dropquant supports.

    The hash alone fails twice: it folds in the vocabulary, so a Qwen2-pipeline tokenizer over another vocabulary
    (what transformers makes of any model_type qwen2, see _pre_from_pipeline) is in no table; and it folds in the
    BOS, so Llama-3's tokenizer.json without the BOS-adding post-processor hashes as smaug-bpe, whose llama.cpp
    tokenizer lacks the ignore_merges that Llama-3's BPE has (588 of its tokens, encoded alone, then split)."""
    spec = pipeline(tokenizer)
    ignore_merges = bool((spec.get("model") or {}).get("ignore_merges"))
    fingerprint = chkhsh(tokenizer)
    name = BPE_PRE_BY_HASH.get(fingerprint) or _pre_from_pipeline(spec)
    if name is None:
        raise DropquantError(
            f"GGUF export: the tokenizer's BPE pre-tokenizer is not recognized (chkhsh {fingerprint}); use a GGUF "
            "model.source (its tokenizer is carried over) or convert with llama.cpp's convert_hf_to_gguf.py")
    if name in LLAMA3_PRE.values():
        name = LLAMA3_PRE[ignore_merges]
    return name


def pipeline(tokenizer) -> dict:
    """What a fast tokenizer does around its vocabulary, in tokenizer.json's terms: model type and flags,
    normalizer, pre-tokenizer, decoder. Read part by part: the whole JSON of a 150k vocabulary takes ~1 s to parse."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {}

    def part(component):
        return json.loads(component.__getstate__()) if component is not None else None

    model = backend.model
    flags = ("ignore_merges", "byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "dropout",
             "unk_token", "fuse_unk")
    return {"model": {"type": type(model).__name__, **{k: getattr(model, k, None) for k in flags}},
            "normalizer": part(backend.normalizer), "pre_tokenizer": part(backend.pre_tokenizer),
            "decoder": part(backend.decoder)}


def _pre_from_pipeline(spec: dict) -> str | None:
    """The llama.cpp pre-tokenizer that does what this tokenizers pipeline does, or None when there is none known.

    Matches only the whole pipeline: one Split on a known regex, then ByteLevel without its own regex or prefix
    space, a plain BPE model. Qwen2's NFC normalizer is accepted as llama.cpp's converter accepts it for Qwen2
    itself: llama.cpp does not normalize, so only text that is not in NFC tokenizes differently."""
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE" or bpe.get("byte_fallback") or bpe.get("continuing_subword_prefix") \
            or bpe.get("end_of_word_suffix"):
        return None
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert") \
            or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex") \
            or byte_level.get("add_prefix_space"):
        return None
    regex = (split.get("pattern") or {}).get("Regex")
    normalizer = spec.get("normalizer")
    if regex == LLAMA3_REGEX and normalizer is None:
        return LLAMA3_PRE[bool(bpe.get("ignore_merges"))]
    if regex == QWEN2_REGEX and normalizer in (None, {"type": "NFC"}) and not bpe.get("ignore_merges"):
        return "qwen2"
    return None


def added_special_tokens(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS in front and EOS at the end, found by encoding: tokenizer_config.json's
    add_bos_token and the tokenizer.json post-processor can both say it, and transformers may rebuild either."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    if full != [bos] * add_bos + plain + [eos] * add_eos:
        raise DropquantError(f"GGUF export: the tokenizer adds special tokens other than BOS/EOS ({plain} -> {full}), "
                             "which llama.cpp cannot reproduce")
    return add_bos, add_eos


def add_hf_tokenizer(w, directory: Path, vocab_size: int) -> None:
    """Write a Hugging Face tokenizer as llama.cpp expects it (convert_hf_to_gguf.py's gpt2 / llama-hf paths)."""
    import gguf

    from dropquant.prune.pruned_checkpoint import load_checkpoint_tokenizer

    try:
        tok = load_checkpoint_tokenizer(directory)
    except (OSError, ValueError) as err:
        raise DropquantError(f"{directory}: cannot load its tokenizer: {err}") from None
    spec = pipeline(tok)
    bpe = spec.get("model") or {}
    byte_level = (bpe.get("type") == "BPE" and not bpe.get("byte_fallback")
                  and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")))
    if byte_level:
        tokens, toktypes = _bpe_tokens(tok, vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(bpe_pre(tok))
        w.add_token_list(tokens)
        w.add_token_types(toktypes)
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    else:
        try:
            vocab = gguf.LlamaHfVocab(directory)
        except Exception as err:  # gguf-py raises several kinds for tokenizers it cannot read
            raise DropquantError(f"{directory}: tokenizer is neither byte-level BPE nor a Llama HF tokenizer ({err})") from None
        tokens, scores, toktypes = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            toktypes.append(toktype)
        tokens += [f"[PAD{i}]".encode() for i in range(len(tokens), vocab_size)]
        scores += [-1000.0] * (vocab_size - len(scores))
        toktypes += [gguf.TokenType.UNUSED] * (vocab_size - len(toktypes))
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(toktypes)
        special = gguf.SpecialVocab(directory, n_vocab=len(tokens))
    # SpecialVocab reads the files; the tokenizer transformers builds from them is what the model was used with.
    special.add_special_token["bos"], special.add_special_token["eos"] = added_special_tokens(tok)
    special.add_to_gguf(w, quiet=True)


def _bpe_tokens(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, toktypes = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        text = reverse[i]
        if text in added:
            if i in decoder and not decoder[i].normalized:
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            special = i in decoder and decoder[i].special
            toktypes.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, toktypes
