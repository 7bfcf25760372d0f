//! Chat messages and conversations, the input of every chat format.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The role name of the model's own turns.
pub const ASSISTANT: &str = "assistant";

/// One chat message, as in Hugging Face's `messages` lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (any non-empty role is rendered as given).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(ASSISTANT, content)
    }

    /// Whether this is one of the model's own turns (the ones that get labels).
    pub fn is_assistant(&self) -> bool {
        self.role == ASSISTANT
    }
}

/// A whole conversation: the unit that is rendered, tokenised and labelled.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Conversation {
    /// The messages in order.
    pub messages: Vec<Message>,
}

impl Conversation {
    /// A conversation made of `messages`.
    pub fn new(messages: Vec<Message>) -> Self {
        Self { messages }
    }

    /// Checks what every chat format needs: at least one message, non-empty roles, and
    /// non-blank assistant answers; with `need_answer`, at least one assistant message.
    pub fn validate(&self, need_answer: bool) -> Result<()> {
        validate_messages(&self.messages, need_answer)
    }
}

/// See [`Conversation::validate`].
pub(crate) fn validate_messages(messages: &[Message], need_answer: bool) -> Result<()> {
    if messages.is_empty() {
        return Err(Error::EmptyConversation);
    }
    for (turn, m) in messages.iter().enumerate() {
        if m.role.trim().is_empty() {
            return Err(Error::EmptyRole { turn });
        }
        if m.is_assistant() && m.content.trim().is_empty() {
            return Err(Error::EmptyAnswer { turn });
        }
    }
    if need_answer && !messages.iter().any(Message::is_assistant) {
        return Err(Error::NoAssistantTurn);
    }
    Ok(())
}
