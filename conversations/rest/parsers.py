"""The REST API's request parser: DRF's JSON parser on the one client-JSON decoder."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from rest_framework import exceptions
from rest_framework.parsers import JSONParser

from conversations.protocol import InvalidFrame, json_parse


class JsonBodyParser(JSONParser):
    """`protocol.json_parse` for REST bodies: a body nested too deep, holding NUL or lone
    surrogates, or NaN is a 400 (DRF's parser raised RecursionError: a 500). The size limit is
    Django's (`request.body` raises RequestDataTooBig past DATA_UPLOAD_MAX_MEMORY_SIZE); DRF may
    hand us the raw stream instead, so it is applied here too. Imported by settings: nothing
    here may import DRF's views."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        raw = stream.read() if limit is None else stream.read(limit + 1)
        if limit is not None and len(raw) > limit:
            raise RequestDataTooBig("Request body exceeded settings.DATA_UPLOAD_MAX_MEMORY_SIZE.")
        try:
            return json_parse(raw)
        except InvalidFrame as error:
            raise exceptions.ParseError(f"the request body is not usable: {error}") from None
