"""Ship a quantized model: a compact, checksummed `.inq` file of b-bit codes.

    from inq_jax import export
    stats = export.save("model.inq", params, state, extras={"batch_stats": bs})
    params = export.load("model.inq")                      # bit-identical
    params, extras = export.load_with_extras("model.inq")

Every leaf INQ quantized (a path in `state.exponents`) is stored as codes of
its own width b (`INQConfig.bits`, or its `layer_bits` entry): zero, sign and
exponent index n1 - k (see `inq_jax._packing`), with its n1 (one per layer, or
one per output channel), in the smallest layout the writer tries:
"packed" (exactly b bits per weight), "codes+deflate" / "sparse+deflate"
(Huffman-coded bytes, all codes or a nonzero bitmap plus the nonzero codes) or
"packed+lzma" / "sparse+lzma" (LZMA2, for leaves with repeated runs). Every
other leaf (biases, BN parameters, `extras`) is stored raw in its own dtype.

File format, version 1 (all integers little-endian):

    prefix  36 bytes: magic b"\\x89INQJAX\\n", u32 version, u64 header length,
            u64 file length, u32 CRC32 of the header, u32 CRC32 of the 32
            prefix bytes before it
    header  UTF-8 JSON: {"format", "version", "bits" (the config's default
            width), "inq" (the INQConfig and step), "params": nested dict of
            leaf indices, "extras": {name: nested dict of leaf indices},
            "leaves": [entry, ...]}; an entry has path, kind
            ("quantized"/"raw"), shape, dtype, layout, offset and length
            (bytes, relative to the end of the header), crc32 of its section,
            group ("params"/"extras"), and for quantized leaves bits (the
            leaf's own width: "bits", or one of the widths in
            inq.layer_bits) and n1 (an int, or a list with one per output
            channel)
    data    the sections, back to back in leaf order, nothing else

No pickle anywhere: the header is JSON and every section is plain bytes.

Reading trusts nothing in the file. Before any section is decoded it checks
the magic, version, lengths and CRCs, bounds the header's size
(`MAX_HEADER_BYTES`) and nesting (`MAX_TREE_DEPTH`), and checks every header
field's type and range: dtypes from a whitelist (`QUANTIZED_DTYPES`,
`RAW_DTYPES`), every n1 with its whole codebook (and rounding edge 2^(n2-1))
inside the stored dtype's normal numbers, the rule `init` applies
(`_codebook.representable`), each section's declared size possible for its
layout, the sections tiling the data exactly, and the trees naming every leaf
exactly once at its own path. Compressed sections are inflated with an output
cap of the size their entry declares. Codes outside their codebook are
refused. Any failure is a `ValueError` naming the file and what is wrong;
`inspect` is the one decode that `load` and `inq_jax.verify_file` share.

What the checks guarantee, and what they do not: the CRC32s detect accidental
damage (a flipped bit, a truncated copy), and the field checks refuse any file
that is malformed, so such a file never loads as wrong weights. A CRC is no
defence against a deliberate edit: whoever changes a code to another valid
one and recomputes the CRCs gets a well-formed file that loads as a different
model. To detect that, publish the file's SHA-256 where the file's editor
cannot change it: `save(..., sha256_file=True)` writes `<path>.sha256` in
`sha256sum` format (and the stats hold the digest); `sha256sum -c` or
`python -m inq_jax.verify_file FILE --sha256 [DIGEST or FILE.sha256]` checks
it, and `file_sha256` computes it.

Reference: Zhou et al., "Incremental Network Quantization", ICLR 2017,
arXiv:1702.03044, Sec. 1 and 2.1 (b-bit power-of-two weights for deployment).
"""

from __future__ import annotations

from inq_jax._export_format import (FORMAT, MAX_HEADER_BYTES, MAX_NDIM, MAX_TREE_DEPTH,
                                    QUANTIZED_DTYPES, RAW_DTYPES, SHA256_SUFFIX,
                                    DecodedLeaf, ExportFile, QuantizedCodes)
from inq_jax._export_reader import (file_sha256, inspect, load, load_with_extras,
                                    read_codes, read_header)
from inq_jax._export_writer import save

__all__ = ["DecodedLeaf", "ExportFile", "FORMAT", "MAX_HEADER_BYTES", "MAX_NDIM",
           "MAX_TREE_DEPTH", "QUANTIZED_DTYPES", "RAW_DTYPES",
           "SHA256_SUFFIX", "QuantizedCodes", "file_sha256", "inspect", "load",
           "load_with_extras", "read_codes", "read_header", "save"]
