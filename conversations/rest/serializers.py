"""REST shapes: request bodies parsed strictly, responses rendered from model rows."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import serializers

from conversations.models import Conversation, Message
from conversations.protocol import InvalidFrame, validate_content


class StrictSerializer(serializers.Serializer):
    """Unknown fields are an error, not silently ignored (as on the socket)."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = set(data) - set(self.fields)
            if unknown:
                raise serializers.ValidationError({name: ["unknown field"] for name in sorted(unknown)})
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    """A JSON string, not anything that str() accepts."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """A JSON boolean, not "yes" or 1."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictSlugField(StrictCharField, serializers.SlugField):
    """A JSON string that is a slug (not a number turned into one)."""


class ConversationCreateSerializer(StrictSerializer):
    assistant = StrictSlugField(max_length=64, required=False, allow_null=True, default=None)
    end_user = StrictCharField(max_length=200, required=False, allow_null=True, default=None)
    title = StrictCharField(max_length=200, required=False, allow_blank=True, default="")


class ConversationSerializer(serializers.ModelSerializer):
    assistant = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    end_user = serializers.SlugRelatedField(slug_field="external_id", read_only=True)

    class Meta:
        model = Conversation
        fields = ["id", "assistant", "end_user", "title", "created_at", "updated_at"]
        read_only_fields = fields


class MessageCreateSerializer(StrictSerializer):
    content = StrictCharField(max_length=settings.MAX_MESSAGE_CHARS, trim_whitespace=False)
    stream = StrictBooleanField(required=False, default=False)
    client_msg_id = StrictCharField(max_length=100, required=False, allow_null=True, default=None)

    def validate_content(self, value: str) -> str:
        try:
            return validate_content(value)
        except InvalidFrame as error:
            raise serializers.ValidationError(str(error)) from None


class MessageSerializer(serializers.ModelSerializer):
    class Meta:
        model = Message
        fields = [
            "id", "seq", "role", "content", "status", "tokens", "model", "finish_reason",
            "tool_calls", "cached", "created_at",
        ]
        read_only_fields = fields


class EndUserTokenRequestSerializer(StrictSerializer):
    ttl = StrictIntegerField(min_value=1, max_value=30 * 24 * 3600, required=False)


class EndUserTokenSerializer(serializers.Serializer):
    token = serializers.CharField()
    expires_at = serializers.DateTimeField()
