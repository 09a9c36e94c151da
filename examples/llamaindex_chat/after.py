"""An existing LlamaIndex chat engine, running offline on the local model (before.py: no memory; after.py: memplug)."""

from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.memory import Memory as ChatMemory

from memplug import Memory
from memplug_llamaindex import MemplugLLM, MemplugMemoryBlock

QUESTION = "What is the name of the user's cat?"


def main() -> dict[str, str]:
    answers = {}
    with Memory() as mem:
        mem.write("alice", "The user's cat is named Pepper.")
        mem.write("bob", "The user's cat is named Socks.")
        llm = MemplugLLM(memory=mem, max_tokens=24)  # SmolLM2, on this machine
        for user in ("alice", "bob"):
            chat_memory = ChatMemory.from_defaults(session_id=user, tokenizer_fn=str.split,
                                                   memory_blocks=[MemplugMemoryBlock(memory=mem, scope=user)])
            engine = SimpleChatEngine.from_defaults(llm=llm, memory=chat_memory)
            answers[user] = engine.chat(QUESTION).response
            print(f"{user}: {answers[user]}")
    return answers


if __name__ == "__main__":
    main()
