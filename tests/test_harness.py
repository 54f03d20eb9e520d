"""The test harness's own promises (counter/testing)."""

import os
import shutil
import threading
import time

from counter.testing.harness import remove_tree


def test_remove_tree_finishes_while_a_process_keeps_adding_files(tmp_path):
    """A service recreates segment files while SHM_DIR is being removed: one
    shutil.rmtree then fails with ENOTEMPTY (it did in CI); remove_tree retries."""
    folder = tmp_path / "shm"
    stop = threading.Event()

    def writer():  # bounded: at most 20,000 empty files, one every 0.2 ms
        for i in range(20_000):
            if stop.is_set():
                return
            try:
                (folder / f"late-{i}").touch()
            except FileNotFoundError:
                pass
            time.sleep(0.0002)

    thread = threading.Thread(target=writer)
    thread.start()
    plain_failures = 0
    try:
        for _ in range(30):
            folder.mkdir(exist_ok=True)
            for j in range(50):
                (folder / f"segment-{j}").touch()
            try:
                shutil.rmtree(folder)
            except OSError:
                plain_failures += 1
                remove_tree(folder)
            assert not folder.exists()
    finally:
        stop.set()
        thread.join()
    assert plain_failures > 0  # the race is real here, so remove_tree was exercised
    assert os.path.isdir(tmp_path)
