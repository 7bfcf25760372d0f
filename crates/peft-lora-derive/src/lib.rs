//! `#[derive(LoraModel)]`: implements `peft_lora::LoraModules` (the walk over the fields) and
//! `peft_lora::LoraModel` for a Burn module struct, so that its `LoraLinear` layers and
//! `TrainableTokens` tables are found by the names Burn records (`encoder.fc1`,
//! `model.layers.0.self_attn.q_proj`) and no path is typed by hand. Use it through
//! `peft_lora::LoraModel`, which re-exports it; the documentation lives there.

use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, Data, DeriveInput, Fields, GenericParam};

/// Derives `peft_lora::LoraModules` and `peft_lora::LoraModel` for a struct with a Burn
/// backend type parameter (see `peft_lora::LoraModel`).
///
/// Field attributes: `#[lora(head)]` lists the field's linears as heads (never LoRA targets,
/// `modules_to_save` only), `#[lora(skip)]` leaves the field out; `#[module(skip)]` fields are
/// left out as Burn leaves them out. Struct attribute: `#[lora_model(hooks)]` takes
/// `replicate_layers`, `vocab_size` and `supports_alora` from the struct's
/// `peft_lora::LoraModelHooks` impl.
#[proc_macro_derive(LoraModel, attributes(lora, lora_model))]
pub fn derive_lora_model(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// What a field's attributes say.
#[derive(Default)]
struct FieldOpts {
    skip: bool,
    head: bool,
}

fn field_opts(attrs: &[syn::Attribute]) -> syn::Result<FieldOpts> {
    let mut opts = FieldOpts::default();
    for attr in attrs {
        if attr.path().is_ident("lora") {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("head") {
                    opts.head = true;
                    Ok(())
                } else if meta.path.is_ident("skip") {
                    opts.skip = true;
                    Ok(())
                } else {
                    Err(meta.error("expected `head` or `skip`"))
                }
            })?;
        } else if attr.path().is_ident("module") {
            // Burn's `#[module(skip)]`: not a module, not recorded.
            let _ = attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("skip") {
                    opts.skip = true;
                }
                Ok(())
            });
        }
    }
    Ok(opts)
}

fn struct_hooks(attrs: &[syn::Attribute]) -> syn::Result<bool> {
    let mut hooks = false;
    for attr in attrs {
        if attr.path().is_ident("lora_model") {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("hooks") {
                    hooks = true;
                    Ok(())
                } else {
                    Err(meta.error("expected `hooks`"))
                }
            })?;
        }
    }
    Ok(hooks)
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let name = &input.ident;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            name,
            "#[derive(LoraModel)] supports structs only",
        ));
    };
    let backend = input
        .generics
        .params
        .iter()
        .find_map(|p| match p {
            GenericParam::Type(t) => Some(t.ident.clone()),
            _ => None,
        })
        .ok_or_else(|| {
            syn::Error::new_spanned(
                name,
                "#[derive(LoraModel)] needs the Burn backend type parameter (`struct Net<B: Backend>`)",
            )
        })?;
    let hooks = struct_hooks(&input.attrs)?;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();

    let mut walk = Vec::new();
    let mut walk_mut = Vec::new();
    let members: Vec<(syn::Member, String, &syn::Field)> = match &data.fields {
        Fields::Named(f) => f
            .named
            .iter()
            .map(|f| {
                let id = f.ident.clone().expect("named field");
                (syn::Member::Named(id.clone()), id.to_string(), f)
            })
            .collect(),
        Fields::Unnamed(f) => f
            .unnamed
            .iter()
            .enumerate()
            .map(|(i, f)| (syn::Member::Unnamed(i.into()), i.to_string(), f))
            .collect(),
        Fields::Unit => Vec::new(),
    };
    for (member, label, field) in members {
        let opts = field_opts(&field.attrs)?;
        if opts.skip {
            continue;
        }
        let head = opts.head;
        walk.push(quote! {
            {
                let __path = ::peft_lora::__derive::join(path, #label);
                let __was = found.enter_head(#head);
                (&::peft_lora::__derive::Probe::<#backend, _>::new(&self.#member))
                    .lora_walk(&__path, found);
                found.exit_head(__was);
            }
        });
        walk_mut.push(quote! {
            {
                let __path = ::peft_lora::__derive::join(path, #label);
                let __was = found.enter_head(#head);
                (&mut ::peft_lora::__derive::ProbeMut::<#backend, _>::new(&mut self.#member))
                    .lora_walk_mut(&__path, found);
                found.exit_head(__was);
            }
        });
    }

    let hook_fns = if hooks {
        quote! {
            fn replicate_layers(&mut self, ranges: &[[usize; 2]]) -> ::peft_lora::Result<()> {
                ::peft_lora::LoraModelHooks::<#backend>::replicate_layers(self, ranges)
            }
            fn vocab_size(&self) -> Option<usize> {
                ::peft_lora::LoraModelHooks::<#backend>::vocab_size(self)
            }
            fn supports_alora(&self) -> bool {
                ::peft_lora::LoraModelHooks::<#backend>::supports_alora(self)
            }
        }
    } else {
        quote! {}
    };
    let lt = syn::Lifetime::new("'__lora_a", proc_macro2::Span::call_site());
    Ok(quote! {
        impl #impl_generics ::peft_lora::LoraModules<#backend> for #name #ty_generics #where_clause {
            fn lora_walk<#lt>(
                &#lt self,
                path: &str,
                found: &mut ::peft_lora::Found<#lt, #backend>,
            ) {
                #[allow(unused_imports)]
                use ::peft_lora::__derive::{ViaModules as _, ViaNothing as _};
                #(#walk)*
            }
            fn lora_walk_mut<#lt>(
                &#lt mut self,
                path: &str,
                found: &mut ::peft_lora::FoundMut<#lt, #backend>,
            ) {
                #[allow(unused_imports)]
                use ::peft_lora::__derive::{ViaModulesMut as _, ViaNothingMut as _};
                #(#walk_mut)*
            }
        }

        impl #impl_generics ::peft_lora::LoraModel<#backend> for #name #ty_generics #where_clause {
            fn lora_linears(&self) -> Vec<(String, &::peft_lora::LoraLinear<#backend>)> {
                ::peft_lora::Found::of(self).linears
            }
            fn lora_linears_mut(&mut self) -> Vec<(String, &mut ::peft_lora::LoraLinear<#backend>)> {
                ::peft_lora::FoundMut::of(self).linears
            }
            fn head_linears(&self) -> Vec<(String, &::peft_lora::LoraLinear<#backend>)> {
                ::peft_lora::Found::of(self).heads
            }
            fn head_linears_mut(&mut self) -> Vec<(String, &mut ::peft_lora::LoraLinear<#backend>)> {
                ::peft_lora::FoundMut::of(self).heads
            }
            fn token_tables(&self) -> Vec<(String, &::peft_lora::TrainableTokens<#backend>)> {
                ::peft_lora::Found::of(self).tables
            }
            fn token_tables_mut(&mut self) -> Vec<(String, &mut ::peft_lora::TrainableTokens<#backend>)> {
                ::peft_lora::FoundMut::of(self).tables
            }
            #hook_fns
        }
    })
}
