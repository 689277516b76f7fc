//! LLaVA-1.5 in candle.
