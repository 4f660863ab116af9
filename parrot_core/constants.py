"""Numbers fixed by the official Parrot code (AIDC-AI/Parrot, parrot/utils/constants.py)."""

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
ROLE_HEADERS = {
    "system": "<|im_start|>system\n",
    "human": "<|im_start|>user\n",
    "gpt": "<|im_start|>assistant\n",
}
