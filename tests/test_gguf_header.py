"""The GGUF header reader (dropquant.gguf.header) against gguf-py's full GGUFReader, on real files."""
from __future__ import annotations

import gguf
import numpy as np


def _gguf_py_metadata(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's own pseudo-fields (version, counts)
            continue
        subtype = int(f.types[-1]) if f.types[0] == gguf.GGUFValueType.ARRAY else None
        out[key] = (f.contents(), int(f.types[0]), subtype)
    return out


def test_metadata_equals_gguf_py_on_the_embedded_model(tokenizer_gguf):
    from dropquant.gguf.header import read_metadata

    ours, theirs = read_metadata(tokenizer_gguf), _gguf_py_metadata(tokenizer_gguf)
    assert list(ours) == list(theirs)  # every key, in file order
    for key, (value, vtype, subtype) in theirs.items():
        got = ours[key]
        assert got[1:] == (vtype, subtype), key
        if isinstance(value, float):
            assert np.float32(got[0]) == np.float32(value), key
        else:
            assert got[0] == value, key
    assert len(ours["tokenizer.ggml.tokens"][0]) == 49152
    assert set(read_metadata(tokenizer_gguf, "tokenizer.")) == {k for k in theirs if k.startswith("tokenizer.")}


def test_a_copied_tokenizer_is_the_source_tokenizer(tiny_gguf, tokenizer_gguf):
    """The tiny GGUF (exported with copy_tokenizer) holds the embedded model's tokenizer.* keys exactly."""
    _, path = tiny_gguf
    source, copy = _gguf_py_metadata(tokenizer_gguf), _gguf_py_metadata(path)
    keys = [k for k in source if k.startswith("tokenizer.")]
    assert keys and {k: source[k] for k in keys} == {k: copy[k] for k in keys}


def test_metadata_is_read_again_when_the_file_changes(tmp_path, tiny_gguf):
    import shutil

    from dropquant.gguf.header import read_metadata

    _, path = tiny_gguf
    local = tmp_path / "m.gguf"
    shutil.copy(path, local)
    assert read_metadata(local, "general.name")["general.name"][0] == "tiny"
    w = gguf.GGUFWriter(str(local), "llama")
    w.add_name("other")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert read_metadata(local, "general.name")["general.name"][0] == "other"
