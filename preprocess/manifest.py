"""Re-export of the pack format, which lives in `fastkd.packformat` (imported by the writer here
and by the loaders in fastkd.data alike). Kept so `from fastkd.preprocess.manifest import ...`
keeps working; new code imports fastkd.packformat.
"""

from fastkd.packformat import (FORMAT, FORMAT_VERSION, FORMATS, MANIFEST_NAME, check_outputs,  # noqa: F401
                               file_entry, is_pack_folder, load_manifest, sha256_file, split_files,
                               write_manifest)
