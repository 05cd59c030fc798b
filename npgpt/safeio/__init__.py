"""Reading untrusted files: one safe reader per file kind, small schemas, paths, locks, tensors.

Every file npgpt reads from disk may come from a stranger (a downloaded model folder, a shared data
folder), so nothing in one is trusted before it is checked. This package is the one place that does
the checking; loaders above it (model, tokenizer, checkpoint, data, SFT) call it and add what only
they know (a config must match the tensors present, an id must be below the vocabulary size).

    schema.py    JSON / JSON Lines / TOML under size, depth and number limits; schemas (Int, Float,
                 Str, Bool, Obj, List, check); finite numbers; paths kept inside their folder (inside)
    tensors.py   safetensors: the header checked against the file before any array is allocated;
                 BF16/F16 upcast; finite weights; atomic writes
    lock.py      run_lock: the OS lock a run folder's writer holds for its whole life

The package re-exports every public name, so callers write `from npgpt.safeio import read_json`.
"""

from npgpt.safeio.lock import LOCK_FILE, run_lock  # noqa: F401
from npgpt.safeio.schema import (MAX_DEPTH, MAX_INT_DIGITS, MAX_JSON_BYTES, REQUIRED, Bool, Float, Int,  # noqa: F401
                                 List, Obj, Spec, Str, check, check_value, finite, inside, parse_json, read_json,
                                 read_json_object, read_jsonl, read_limited, read_toml, short)
from npgpt.safeio.tensors import (FLOAT_DTYPES, MAX_DIMS, MAX_HEADER_BYTES, SAFETENSORS_DTYPES,  # noqa: F401
                                  SafetensorsHeader, TensorInfo, bf16_to_f32, check_finite_tensors,
                                  load_safetensors, read_safetensors_header, write_safetensors)
