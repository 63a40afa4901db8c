"""Framework-free core: conversion, optimizer factory, paging and eviction monitoring."""
