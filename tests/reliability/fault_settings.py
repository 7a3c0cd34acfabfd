"""Settings for the subprocesses that tests/reliability/test_faults.py starts and kills.

kb.settings, plus up to two embedding models served by the test's FakeOpenAIServer
instances (whose URLs come in the environment), with small batches so an ingestion or a
re-embedding takes long enough to be interrupted mid-way, and fixed dimensions so no
untracked "dimensions probe" request muddles the count of upstream calls.
"""

import os

from kb.settings import *  # noqa: F403
from kb.settings import KB_PROVIDERS

for _key, _env in (("fake-a", "KB_FAULT_EMBEDDING_A"), ("fake-b", "KB_FAULT_EMBEDDING_B")):
    if os.environ.get(f"{_env}_URL"):
        KB_PROVIDERS["embedding"][_key] = {
            "BACKEND": "kb.providers.openai.OpenAIEmbeddings",
            "MODEL": _key,
            "base_url": os.environ[f"{_env}_URL"],
            "api_key": "sk-test",
            "dimensions": int(os.environ[f"{_env}_DIMENSIONS"]),
            "batch_size": int(os.environ.get("KB_FAULT_EMBEDDING_BATCH", "16")),
            "max_attempts": 2,
            "timeout": 30.0,
        }
