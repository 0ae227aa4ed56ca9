"""The OpenAI SDK's structured-output helper with a Pydantic model, as its docs show it."""
import json
import os

from openai import OpenAI
from pydantic import BaseModel, Field


class CalendarEvent(BaseModel):
    name: str = Field(max_length=24)
    date: str = Field(max_length=12)
    participants: list[str] = Field(max_length=3)


client = OpenAI(base_url=os.environ["BERTH_URL"] + "/v1", api_key=os.environ["BERTH_TOKEN"])
completion = client.chat.completions.parse(
    model=client.models.list().data[0].id,
    messages=[{"role": "system", "content": "Extract the event information."},
              {"role": "user", "content": "Alice and Bob are going to a science fair on Friday."}],
    response_format=CalendarEvent,
    temperature=0,
)
event = completion.choices[0].message.parsed
print(json.dumps({"parsed": event.model_dump(), "finish_reason": completion.choices[0].finish_reason}))
