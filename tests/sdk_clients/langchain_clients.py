"""LangChain's ChatOpenAI against berth: with_structured_output (Pydantic) and bind_tools with a forced tool."""
import json
import os

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


class Joke(BaseModel):
    """A joke to tell the user."""
    setup: str = Field(description="The setup of the joke", max_length=60)
    punchline: str = Field(description="The punchline", max_length=60)


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


llm = ChatOpenAI(base_url=os.environ["BERTH_URL"] + "/v1", api_key=os.environ["BERTH_TOKEN"],
                 model=os.environ["BERTH_MODEL"], temperature=0, max_retries=0)
joke = llm.with_structured_output(Joke).invoke("Tell me a joke about cats")
message = llm.bind_tools([multiply], tool_choice="multiply").invoke("What is 6 times 7?")
print(json.dumps({"joke": joke.model_dump(), "tool_calls": message.tool_calls}))
