//! A writer of news2stock rows as parquet (struct or JSON-string `assistant`, Snappy), in the
//! schema of the Hub copies; used by tools and tests.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{BoolType, ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use crate::error::{Error, Result};
use crate::news2stock::{NewsRow, StockAnswer};

/// How [`write_news_parquet`] stores `assistant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssistantColumn {
    /// A struct with the schema's eight fields (as the Hub copies store it).
    Struct,
    /// The rendered JSON answer as a string.
    JsonString,
}

const STRUCT_SCHEMA: &str = "message news2stock {
  REQUIRED BYTE_ARRAY system (UTF8);
  REQUIRED BYTE_ARRAY user (UTF8);
  REQUIRED group assistant {
    REQUIRED BOOLEAN stock_related;
    REQUIRED BYTE_ARRAY summary (UTF8);
    REQUIRED group positive_stocks (LIST) { REPEATED group list { REQUIRED BYTE_ARRAY element (UTF8); } }
    REQUIRED group positive_keywords (LIST) { REPEATED group list { REQUIRED BYTE_ARRAY element (UTF8); } }
    REQUIRED BYTE_ARRAY positive_reasons (UTF8);
    REQUIRED group negative_stocks (LIST) { REPEATED group list { REQUIRED BYTE_ARRAY element (UTF8); } }
    REQUIRED group negative_keywords (LIST) { REPEATED group list { REQUIRED BYTE_ARRAY element (UTF8); } }
    REQUIRED BYTE_ARRAY negative_reasons (UTF8);
  }
}";

const STRING_SCHEMA: &str = "message news2stock {
  REQUIRED BYTE_ARRAY system (UTF8);
  REQUIRED BYTE_ARRAY user (UTF8);
  REQUIRED BYTE_ARRAY assistant (UTF8);
}";

/// One leaf column's data in write order.
enum Leaf {
    Strings(Vec<ByteArray>),
    Bools(Vec<bool>),
    /// Values with definition and repetition levels (a list of strings).
    List(Vec<ByteArray>, Vec<i16>, Vec<i16>),
}

fn list_leaf<'a>(lists: impl Iterator<Item = &'a [String]>) -> Leaf {
    let (mut vals, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
    for list in lists {
        if list.is_empty() {
            def.push(0);
            rep.push(0);
        }
        for (i, s) in list.iter().enumerate() {
            vals.push(ByteArray::from(s.as_str()));
            def.push(1);
            rep.push(i16::from(i > 0));
        }
    }
    Leaf::List(vals, def, rep)
}

/// Writes `rows` as a Snappy parquet file in the news2stock schema. With
/// [`AssistantColumn::Struct`] every row needs a parsed answer.
pub fn write_news_parquet(
    rows: &[NewsRow],
    path: impl AsRef<Path>,
    assistant: AssistantColumn,
) -> Result<()> {
    let path = path.as_ref();
    let strings = |f: &dyn Fn(&NewsRow) -> &str| {
        Leaf::Strings(rows.iter().map(|r| ByteArray::from(f(r))).collect())
    };
    let mut leaves = vec![strings(&|r| &r.system), strings(&|r| &r.user)];
    let schema = match assistant {
        AssistantColumn::JsonString => {
            leaves.push(strings(&|r| &r.assistant));
            STRING_SCHEMA
        }
        AssistantColumn::Struct => {
            let mut answers = Vec::with_capacity(rows.len());
            for (i, r) in rows.iter().enumerate() {
                answers.push(r.answer.as_ref().ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "row {i}: the assistant answer is not in the news2stock schema, so it \
                         cannot be written as a struct"
                    ))
                })?);
            }
            let s = |f: &dyn Fn(&StockAnswer) -> &str| {
                Leaf::Strings(answers.iter().map(|a| ByteArray::from(f(a))).collect())
            };
            leaves.push(Leaf::Bools(
                answers.iter().map(|a| a.stock_related).collect(),
            ));
            leaves.push(s(&|a| &a.summary));
            leaves.push(list_leaf(
                answers.iter().map(|a| a.positive_stocks.as_slice()),
            ));
            leaves.push(list_leaf(
                answers.iter().map(|a| a.positive_keywords.as_slice()),
            ));
            leaves.push(s(&|a| &a.positive_reasons));
            leaves.push(list_leaf(
                answers.iter().map(|a| a.negative_stocks.as_slice()),
            ));
            leaves.push(list_leaf(
                answers.iter().map(|a| a.negative_keywords.as_slice()),
            ));
            leaves.push(s(&|a| &a.negative_reasons));
            STRUCT_SCHEMA
        }
    };
    let failed = |e: parquet::errors::ParquetError| Error::Parquet {
        path: path.to_path_buf(),
        message: format!("write failed: {e}"),
    };
    let schema = Arc::new(parse_message_type(schema).map_err(failed)?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut writer = SerializedFileWriter::new(file, schema, props).map_err(failed)?;
    let mut group = writer.next_row_group().map_err(failed)?;
    for leaf in &leaves {
        let Some(mut col) = group.next_column().map_err(failed)? else {
            break;
        };
        match leaf {
            Leaf::Strings(v) => col
                .typed::<ByteArrayType>()
                .write_batch(v, None, None)
                .map(drop),
            Leaf::Bools(v) => col.typed::<BoolType>().write_batch(v, None, None).map(drop),
            Leaf::List(v, def, rep) => col
                .typed::<ByteArrayType>()
                .write_batch(v, Some(def), Some(rep))
                .map(drop),
        }
        .map_err(failed)?;
        col.close().map_err(failed)?;
    }
    group.close().map_err(failed)?;
    writer.close().map_err(failed)?;
    Ok(())
}
