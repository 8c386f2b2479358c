"""Where a sweep lives: `<storage-path>/<name>`, a local folder or a URI (s3://, gs://) every node reaches."""

from __future__ import annotations

from pathlib import Path

from tune_bir.errors import ConfigError

# The files a sweep writes into its folder, beside Ray Tune's own experiment state and trial folders.
SWEEP_FILE, RESULTS_FILE, BEST_FILE = "sweep.json", "results.csv", "best_config.json"
# The confirmation runs of a sweep (`--confirm`) live in this sub-folder, as a sweep of their own.
CONFIRM_DIR = "confirm"
CONFIRM_FILE = "confirm.json"


def is_uri(location: str) -> bool:
    """A remote storage URI (s3://, gs://, ...) rather than a local path."""
    return "://" in location


def join(location: str, *parts: str) -> str:
    """`location/part/...`; a URI's query (`s3://b/p?endpoint_override=HOST:PORT&scheme=http`, which pyarrow and
    Ray read) stays at the end."""
    base, mark, query = location.partition("?") if is_uri(location) else (location, "", "")
    return "/".join([base.rstrip("/"), *parts]) + mark + query


class SweepFolder:
    """The folder of one sweep, `<storage-path>/<name>`: a local path, or a URI (s3://, gs://) on a cluster."""

    def __init__(self, root: str, name: str):
        self.root, self.name = root, name
        self.location = join(root, name)

    @classmethod
    def at(cls, storage_path: str, name: str) -> SweepFolder:
        root = join(storage_path) if is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())
        return cls(root, name)

    @classmethod
    def of(cls, location: str) -> SweepFolder:
        """The sweep folder at a full location (`<storage-path>/<name>`), as the user names a finished sweep."""
        base, mark, query = location.partition("?") if is_uri(location) else (location, "", "")
        base = base.rstrip("/") if is_uri(location) else str(Path(location).expanduser().resolve())
        root, _, name = base.rpartition("/")
        return cls(root + mark + query, name)

    def sub(self, name: str) -> SweepFolder:
        """A folder inside this one, e.g. the confirmation runs."""
        return SweepFolder(self.location, name)

    def __str__(self) -> str:
        return self.location

    @property
    def is_local(self) -> bool:
        return not is_uri(self.root)

    def _fs(self, location: str):
        import pyarrow.fs

        try:
            if self.is_local:
                return pyarrow.fs.LocalFileSystem(), location
            return pyarrow.fs.FileSystem.from_uri(location)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot use --storage-path {self.root}: {err}") from err

    def exists(self, file: str) -> bool:
        import pyarrow.fs

        fs, path = self._fs(join(self.location, file))
        try:
            return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
        except OSError as err:
            raise ConfigError(f"cannot read --storage-path {self.root}: {err}") from err

    def read_text(self, file: str) -> str:
        fs, path = self._fs(join(self.location, file))
        with fs.open_input_stream(path) as f:
            return f.read().decode()

    def write_text(self, file: str, text: str) -> None:
        fs, path = self._fs(self.location)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{file}") as f:
            f.write(text.encode())

    def latest_sibling(self) -> SweepFolder | None:
        """The sweep under the same storage path whose sweep.json changed last."""
        import pyarrow.fs

        fs, path = self._fs(self.root)
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True, recursive=False))
        except OSError as err:
            raise ConfigError(f"cannot read --storage-path {self.root}: {err}") from err
        found = []
        for info in infos:
            if info.type == pyarrow.fs.FileType.Directory:
                marker = fs.get_file_info(f"{info.path}/{SWEEP_FILE}")
                if marker.type == pyarrow.fs.FileType.File:
                    found.append((marker.mtime, info.base_name))
        return SweepFolder(self.root, max(found)[1]) if found else None
