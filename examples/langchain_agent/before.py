"""An existing LangChain agent, running offline on the local model (before.py: no memory; after.py: memplug)."""

from langchain.agents import create_agent
from langchain_core.messages import HumanMessage

from memplug import Memory
from memplug_langchain import ChatMemplug

QUESTION = "What is the name of the user's cat?"
SYSTEM = "Answer in one short sentence."


def main() -> dict[str, str]:
    answers = {}
    with Memory() as mem:
        model = ChatMemplug(memory=mem, max_tokens=24)  # SmolLM2, on this machine
        agent = create_agent(model, tools=[], system_prompt=SYSTEM)
        for user in ("alice", "bob"):
            out = agent.invoke({"messages": [HumanMessage(QUESTION)]})
            answers[user] = out["messages"][-1].content
            print(f"{user}: {answers[user]}")
    return answers


if __name__ == "__main__":
    main()
