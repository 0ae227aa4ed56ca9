"""An openai-agents agent over berth's Chat Completions API: it calls one function tool, then answers.

NOTE: the agent answers with its tool's result (tool_use_behavior="stop_on_first_tool"). Given the tool
result back, the 135M default model repeats its call instead of writing an answer, so a second model
turn would loop until max_turns; a bigger model ends the loop itself."""
import json
import os

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

set_tracing_disabled(True)
calls = []


@function_tool
def get_weather(city: str) -> str:
    """Get the weather for a city."""
    calls.append(city)
    return f"The weather in {city} is sunny, 21 degrees."


client = AsyncOpenAI(base_url=os.environ["BERTH_URL"] + "/v1", api_key=os.environ["BERTH_TOKEN"])
agent = Agent(name="Weather", instructions="You answer questions about the weather using your tool.",
              tools=[get_weather],
              model=OpenAIChatCompletionsModel(model=os.environ["BERTH_MODEL"], openai_client=client),
              model_settings=ModelSettings(tool_choice="required", parallel_tool_calls=False, temperature=0,
                                           max_tokens=64),
              tool_use_behavior="stop_on_first_tool")
result = Runner.run_sync(agent, "What's the weather in Tokyo?", max_turns=4)
print(json.dumps({"tool_calls": calls, "final_output": result.final_output}))
